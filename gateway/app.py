"""``gateway run``: one Twisted process, a MultiService of the gateway's parts.

The store (worker threads), the HTTP API and the FastAGI listener are services that start
and stop in order: on SIGTERM the listeners stop accepting first, then the calls already
accepted finish writing, then the store's threads end. Channels not configured are absent.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass, field
from typing import Any

from twisted.application import internet, service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorCore, IReactorTCP, IReactorTime

from gateway.config import Config
from gateway.health import HealthCheck, agi_health, pusher_health
from gateway.health import health_report as components_report
from gateway.http_api import GatewayApi, make_site
from gateway.metrics import GatewayMetrics, observe_smpp
from gateway.workdays import WorkingDayCalendar
from storage.deferred import DeferredStore
from storage.store import Store

log = logging.getLogger("gateway.app")


class ServiceStartError(Exception):
    """A service of the gateway could not start; the ones before it are running and must be stopped."""

    def __init__(self, service_name: str, error: BaseException) -> None:
        super().__init__(f"{service_name}: {error}")
        self.service_name = service_name
        self.error = error


class SequentialMultiService(service.MultiService):
    """Starts its services in order and stops them one by one, last added first.

    The listeners stop (and finish their calls' writes) before the store's threads end. When a
    service fails to start, the ones after it are never started, and stopping stops only those
    that did: a half-started gateway can be stopped cleanly.
    """

    def startService(self) -> None:
        service.Service.startService(self)
        for child in self:
            try:
                child.startService()
            except Exception as error:
                raise ServiceStartError(child.name or type(child).__name__, error) from error

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        service.Service.stopService(self)
        for child in reversed(list(self)):
            if child.running:
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
    metrics: GatewayMetrics | None = None
    #: /health's components besides the store: name -> check (see gateway.health).
    health_checks: dict[str, HealthCheck] = field(default_factory=dict)


def build_gateway(config: Config, reactor: Any, *, store: Store | None = None) -> Gateway:
    """Compose the services; nothing listens until ``root.startService()``."""
    calendar = WorkingDayCalendar.from_override_file(config.calendar.override_file or None)
    store = store or Store.from_config(config)
    root = SequentialMultiService()
    deferred_store = DeferredStore(store, reactor, config.store.threads)
    deferred_store.setServiceParent(root)
    gateway = Gateway(config, store, deferred_store, calendar, root)
    gateway.metrics = metrics = GatewayMetrics(deferred_store, reactor)

    if config.agi.enabled:
        from gateway.ivr.fastagi import build_fastagi_service

        agi = build_fastagi_service(config, reactor, deferred_store)
        agi.setServiceParent(root)
        gateway.health_checks["agi"] = lambda: agi_health(agi)
        metrics.watch_agi(agi.factory.stats)

    if config.platform.enabled:
        from gateway.platform.pusher import build_pusher

        pusher = build_pusher(config, reactor, deferred_store)
        pusher.setServiceParent(root)
        gateway.health_checks["pusher"] = lambda: pusher_health(pusher)
        metrics.watch_pusher(pusher)

    if config.smpp.enabled:
        from gateway.sms.service import build_sms_service

        gateway.sms = build_sms_service(config, reactor, store, deferred_store, calendar)
        gateway.sms.setServiceParent(root)
        gateway.health_checks["smsc"] = gateway.sms.health
        sms = gateway.sms
        metrics.scrape_hooks.append(lambda: observe_smpp(metrics, sms.client.state()))

    if config.http.enabled:
        gateway.api = GatewayApi(
            deferred_store,
            reactor,
            health=lambda: health_report(gateway),
            default_country_code=config.privacy.default_country_code,
            config=config,
            metrics=metrics,
        )
        site = make_site(gateway.api, config.http.max_body_bytes, reactor)
        http = internet.TCPServer(config.http.port, site, interface=config.http.host, backlog=511, reactor=reactor)
        http.setName("http")
        http.setServiceParent(root)
    return gateway


def health_report(gateway: Gateway) -> defer.Deferred[dict[str, Any]]:
    """Each component's state (issue 5 §4): the store, asked, and every registered check."""
    return components_report(gateway.deferred_store, gateway.health_checks)


def run(config: Config, reactor: IReactorCore | IReactorTCP | IReactorTime | Any) -> int:
    """Start every service and run the reactor until SIGTERM/SIGINT.

    Returns 0 after a stop asked for, 1 when a service could not start (a port in use, say):
    what had started is stopped, and the non-zero status lets systemd's Restart=on-failure act.
    """
    gateway = build_gateway(config, reactor)
    exit_status = 0

    listening = [
        f"{name}={getattr(config, name).host}:{getattr(config, name).port}"
        for name in ("http", "agi")
        if getattr(config, name).enabled
    ]

    def start() -> None:
        nonlocal exit_status
        try:
            gateway.root.startService()
        except ServiceStartError as failure:
            exit_status = 1
            log_start_failure(failure)
            reactor.stop()
            return
        log.info("event=gateway.start store=%s %s", gateway.store.engine.dialect.name, " ".join(listening))

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", gateway.root.stopService)
    reactor.run()
    log.info("event=gateway.stopped exit_status=%d", exit_status)
    return exit_status


def log_start_failure(failure: ServiceStartError) -> None:
    """One error line: for a listener, which address and port, and why (an errno name, no spaces)."""
    error = failure.error
    if isinstance(error, CannotListenError):
        code = getattr(error.socketError, "errno", None)
        log.error(
            "event=gateway.cannot_listen service=%s address=%s port=%s error=%s",
            failure.service_name,
            error.interface or "*",
            error.port,
            errno.errorcode.get(code, type(error.socketError).__name__),  # EADDRINUSE, EACCES, ...
        )
    else:
        log.error(
            "event=gateway.start_failed service=%s error=%s",
            failure.service_name,
            type(error).__name__,
            exc_info=error,
        )
