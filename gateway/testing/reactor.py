"""A fresh Twisted reactor per test scenario, for tests that need real sockets and threads.

pytest runs no reactor; :func:`run_on_reactor` runs one scenario on a reactor of its own, with
a time limit, and cleans up after it so that the next test starts from nothing.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.selectreactor import SelectReactor
from twisted.python.failure import Failure


def run_on_reactor(scenario: Callable[[Any], Awaitable[Any]], timeout: float = 20.0) -> Any:
    """Run ``scenario(reactor)`` on a fresh reactor of its own (pytest has none running)."""
    reactor = SelectReactor()
    outcome: list[Any] = []

    def finish(result: Any) -> None:
        outcome.append(result)
        if reactor.running:
            reactor.stop()

    def start() -> None:
        defer.ensureDeferred(scenario(reactor)).addBoth(finish)

    reactor.callWhenRunning(start)
    guard = reactor.callLater(timeout, finish, Failure(TimeoutError(f"scenario still running after {timeout} s")))
    reactor.run(installSignalHandlers=False)
    if guard.active():
        guard.cancel()
    for call in reactor.getDelayedCalls():
        call.cancel()
    reactor.disconnectAll()
    for reader in list(getattr(reactor, "_internalReaders", ())):
        reactor.removeReader(reader)
        reader.connectionLost(None)
    result = outcome[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result


async def sleep(reactor: Any, seconds: float) -> None:
    waiting: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(seconds, waiting.callback, None)
    await waiting


async def wait_until(reactor: Any, predicate: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Poll ``predicate`` every 20 ms without blocking the reactor; its first true value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"not true within {timeout} s: {what or predicate}")
        await sleep(reactor, 0.02)
