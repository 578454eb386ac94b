"""``/health``: each component's state, from checks that the process registers by name.

A check is a callable returning ``{"status": "ok" | "degraded" | "down", ...}`` or a Deferred
of one; :attr:`gateway.app.Gateway.health_checks` holds them (agi, pusher, smsc, …), and
the store is always asked (a ping in a store thread, never assumed). ``degraded`` means the
component works with a problem that loses nothing (the platform refuses or cannot be reached:
ratings wait in the outbox, SPEC R7.2); ``down`` means it does not work, and the answer is 503.
A check that raises reports its component ``down`` with the error's type, never its text.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

from storage.deferred import DeferredStore

HealthCheck = Callable[[], "dict[str, Any] | defer.Deferred[dict[str, Any]]"]
STATUSES = ("ok", "degraded", "down")


def health_report(store: DeferredStore, checks: Mapping[str, HealthCheck]) -> defer.Deferred[dict[str, Any]]:
    """``{"status": the worst component's, "components": {name: state}}``."""
    names = ["store", *checks]
    probes = [store.call("ping").addCallback(lambda _: {"status": "ok"})]
    probes += [defer.maybeDeferred(check) for check in checks.values()]
    for probe in probes:
        probe.addErrback(_down)

    def assemble(states: list[dict[str, Any]]) -> dict[str, Any]:
        components = {name: _checked(state) for name, state in zip(names, states, strict=True)}
        worst = max((STATUSES.index(c["status"]) for c in components.values()), default=0)
        return {"status": STATUSES[worst], "components": components}

    return defer.gatherResults(probes).addCallback(assemble)


def is_down(report: Mapping[str, Any]) -> bool:
    """Whether a component is down: ``/health`` then answers 503."""
    return any(c.get("status") == "down" for c in report.get("components", {}).values())


def _down(failure: Failure) -> dict[str, Any]:
    return {"status": "down", "error": failure.type.__name__}


def _checked(state: Any) -> dict[str, Any]:
    if not isinstance(state, dict) or state.get("status") not in STATUSES:
        return {"status": "down", "error": "the component's check answered no status"}
    return state


def agi_health(service: Any) -> dict[str, Any]:
    """The FastAGI listener (``gateway.ivr.fastagi.FastAGIService``): listening, and its sessions."""
    stats = service.factory.stats
    listening = getattr(service, "_port", None)
    return {
        "status": "ok" if service.running and listening is not None else "down",
        "port": listening.getHost().port if listening is not None else None,
        "activeSessions": stats.active,
        "sessions": stats.started,
        "storeFailures": stats.store_failures,
    }


def pusher_health(pusher: Any) -> dict[str, Any]:
    """Platform reachability (SPEC R7.1): ok, or degraded while requests fail (nothing is lost)."""
    state = pusher.state()
    return {
        **state,
        "status": "ok" if pusher.running and not state["consecutiveFailures"] else "degraded",
        "pusherState": state["status"],
        "platform": "unknown" if state["requests"] == 0 else ("unreachable" if state["consecutiveFailures"] else "ok"),
    }
