"""The store for Twisted code: every call runs in a worker thread and returns a Deferred.

The reactor never waits on the database. SQLite gets one worker (it has one writer anyway,
and one thread avoids busy retries); PostgreSQL gets ``threads`` workers. Stopping waits
for the calls already accepted, so a SIGTERM loses nothing that was acknowledged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from twisted.application.service import Service
from twisted.internet import defer, threads
from twisted.internet.interfaces import IReactorFromThreads, IReactorThreads
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from storage.store import Store

P = ParamSpec("P")
T = TypeVar("T")


class DeferredStore(Service):
    """Runs :class:`Store` methods off the reactor thread."""

    name = "store"

    def __init__(self, store: Store, reactor: IReactorFromThreads | IReactorThreads, threads_: int = 8) -> None:
        self.store = store
        self._reactor = reactor
        size = 1 if store.is_sqlite else threads_
        self._pool = ThreadPool(minthreads=1, maxthreads=size, name="store")
        self._in_flight: set[defer.Deferred[Any]] = set()

    def startService(self) -> None:
        super().startService()
        self._pool.start()

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        while self._in_flight:  # a finishing batch may start the next one
            yield defer.DeferredList(list(self._in_flight), consumeErrors=True)
        self._pool.stop()
        self.store.engine.dispose()

    def run(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> defer.Deferred[T]:
        """Call ``function(*args, **kwargs)`` in a store thread."""
        deferred: defer.Deferred[T] = threads.deferToThreadPool(
            self._reactor,
            self._pool,
            function,
            *args,
            **kwargs,  # type: ignore[arg-type]
        )
        self._in_flight.add(deferred)

        def forget(result: Any) -> Any:
            self._in_flight.discard(deferred)
            return result

        deferred.addBoth(forget)
        return deferred

    def call(self, method: str, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        """Call a :class:`Store` method by name in a store thread."""
        return self.run(getattr(self.store, method), *args, **kwargs)


class GroupWriter:
    """Group commit: writes asked for while a transaction runs go together in the next one.

    At low load each write is its own transaction, at once; under load (hundreds of calls
    ending together) one commit carries many writes, which is what lets a single SQLite
    writer keep up. Each caller still gets its own result or error (see
    :meth:`storage.store.Store.write_together`).
    """

    def __init__(self, store: DeferredStore, max_batch: int = 500) -> None:
        self._store = store
        self._max_batch = max_batch
        self._pending: list[tuple[str, dict[str, Any], defer.Deferred[Any]]] = []
        self._flushing = False

    def write(self, name: str, **kwargs: Any) -> defer.Deferred[Any]:
        """Run ``Store.tx_<name>(connection, **kwargs)`` in the next group transaction."""
        deferred: defer.Deferred[Any] = defer.Deferred()
        self._pending.append((name, kwargs, deferred))
        if not self._flushing:
            self._flush()
        return deferred

    def _flush(self) -> None:
        batch, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch :]
        self._flushing = True
        calls = [(name, kwargs) for name, kwargs, _ in batch]

        def deliver(results: list[Any]) -> None:
            for (_, _, deferred), result in zip(batch, results, strict=True):
                if isinstance(result, BaseException):
                    deferred.errback(Failure(result))
                else:
                    deferred.callback(result)

        def fail_all(failure: Failure) -> None:
            for _, _, deferred in batch:
                deferred.errback(failure)

        def next_batch(_: Any) -> None:
            self._flushing = False
            if self._pending:
                self._flush()

        self._store.run(self._store.store.write_together, calls).addCallbacks(deliver, fail_all).addBoth(next_batch)
