"""``gateway run``: one Twisted process, a MultiService of the gateway's parts.

The store (worker threads), the HTTP API and the FastAGI listener are services that start
and stop in order: on SIGTERM the listeners stop accepting first, then the calls already
accepted finish writing, then the store's threads end. Channels not configured are absent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from twisted.application import internet, service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorCore, IReactorTCP, IReactorTime

from gateway.config import Config
from gateway.http_api import GatewayApi, make_site
from gateway.workdays import WorkingDayCalendar
from storage.deferred import DeferredStore
from storage.store import Store

log = logging.getLogger("gateway.app")


class SequentialMultiService(service.MultiService):
    """Stops its services one by one, last added first, each only after the one before.

    The listeners stop (and finish their calls' writes) before the store's threads end.
    """

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        service.Service.stopService(self)
        for child in reversed(list(self)):
            yield defer.maybeDeferred(child.stopService)


@dataclass
class Gateway:
    """The running process's parts, for tests and for the health report."""

    config: Config
    store: Store
    deferred_store: DeferredStore
    calendar: WorkingDayCalendar
    root: service.MultiService
    api: GatewayApi | None = None
    sms: Any = None  # gateway.sms.service.SmsService when [smpp] enabled


def build_gateway(config: Config, reactor: Any, *, store: Store | None = None) -> Gateway:
    """Compose the services; nothing listens until ``root.startService()``."""
    store = store or Store.from_config(config)
    calendar = WorkingDayCalendar.from_override_file(config.calendar.override_file or None)
    root = SequentialMultiService()
    deferred_store = DeferredStore(store, reactor, config.store.threads)
    deferred_store.setServiceParent(root)
    gateway = Gateway(config, store, deferred_store, calendar, root)

    if config.agi.enabled:
        from gateway.ivr.fastagi import build_fastagi_service

        build_fastagi_service(config, reactor, deferred_store).setServiceParent(root)

    if config.platform.enabled:
        from gateway.platform.pusher import build_pusher

        build_pusher(config, reactor, deferred_store).setServiceParent(root)

    if config.smpp.enabled:
        from gateway.sms.service import build_sms_service

        gateway.sms = build_sms_service(config, reactor, store, deferred_store, calendar)
        gateway.sms.setServiceParent(root)

    if config.http.enabled:
        gateway.api = GatewayApi(
            deferred_store,
            reactor,
            health=lambda: health_report(gateway),
            default_country_code=config.privacy.default_country_code,
        )
        site = make_site(gateway.api, config.http.max_body_bytes)
        http = internet.TCPServer(config.http.port, site, interface=config.http.host, backlog=511)
        http.setName("http")
        http.setServiceParent(root)
    return gateway


def health_report(gateway: Gateway) -> defer.Deferred[dict[str, Any]]:
    """Each component's state (SPEC: operations); the store is asked, not assumed."""

    def store_ok(_: Any) -> dict[str, Any]:
        return {"status": "ok"}

    def store_down(failure: Any) -> dict[str, Any]:
        return {"status": "down", "error": failure.type.__name__}

    probe = gateway.deferred_store.call("ping").addCallbacks(store_ok, store_down)
    smsc = gateway.sms.health() if gateway.sms is not None else defer.succeed(None)

    def assemble(results: list[Any]) -> dict[str, Any]:
        store_state, smsc_state = results
        components: dict[str, Any] = {"store": store_state}
        if gateway.config.agi.enabled:
            components["agi"] = {"status": "ok", "port": gateway.config.agi.port}
        if smsc_state is not None:
            components["smsc"] = smsc_state
        status = "ok" if all(c["status"] == "ok" for c in components.values()) else "degraded"
        return {"status": status, "components": components}

    return defer.gatherResults([probe, smsc]).addCallback(assemble)


def run(config: Config, reactor: IReactorCore | IReactorTCP | IReactorTime | Any) -> int:
    """Start every service and run the reactor until SIGTERM/SIGINT."""
    gateway = build_gateway(config, reactor)
    reactor.callWhenRunning(gateway.root.startService)
    reactor.addSystemEventTrigger("before", "shutdown", gateway.root.stopService)
    listening = [
        f"{name}={getattr(config, name).host}:{getattr(config, name).port}"
        for name in ("http", "agi")
        if getattr(config, name).enabled
    ]
    log.info("event=gateway.start store=%s %s", gateway.store.engine.dialect.name, " ".join(listening))
    reactor.run()
    log.info("event=gateway.stopped")
    return 0
