"""The store for Twisted code: every call runs in a worker thread and returns a Deferred.

The reactor never waits on the database. SQLite gets one worker (it has one writer anyway,
and one thread avoids busy retries); PostgreSQL gets ``threads`` workers. Stopping waits
for the calls already accepted, so a SIGTERM loses nothing that was acknowledged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from twisted.application.service import Service
from twisted.internet import defer, threads
from twisted.internet.interfaces import IReactorFromThreads, IReactorThreads
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from storage.store import Store

log = logging.getLogger("storage.deferred")

#: The window over which the group writer measures how fast writes come in (see GroupWriter).
RATE_WINDOW = 0.05

P = ParamSpec("P")
T = TypeVar("T")


class StoreStopped(RuntimeError):
    """A store call came after the store service stopped."""


class DeferredStore(Service):
    """Runs :class:`Store` methods off the reactor thread."""

    name = "store"

    def __init__(self, store: Store, reactor: IReactorFromThreads | IReactorThreads, threads_: int = 8) -> None:
        self.store = store
        self._reactor = reactor
        size = 1 if store.is_sqlite else threads_
        self._pool = ThreadPool(minthreads=1, maxthreads=size, name="store")
        self._in_flight: set[defer.Deferred[Any]] = set()
        self._stopped = False

    def startService(self) -> None:
        super().startService()
        self._pool.start()

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        while self._in_flight:  # a finishing batch may start the next one
            yield defer.DeferredList(list(self._in_flight), consumeErrors=True)
        self._stopped = True
        self._pool.stop()
        self.store.engine.dispose()

    def run(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> defer.Deferred[T]:
        """Call ``function(*args, **kwargs)`` in a store thread.

        After the store has stopped this fails at once (and says so in the log): a stopped
        thread pool would keep the call queued forever, and its caller waiting for nothing.
        """
        if self._stopped:
            log.error("event=store.call_after_stop call=%s", getattr(function, "__name__", "?"))
            return defer.fail(StoreStopped("the store has stopped; nothing was written"))
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

    def call_from_thread(self, function: Callable[..., Any], *args: Any) -> None:
        """From a store thread: call ``function(*args)`` in the reactor thread, in order of asking."""
        self._reactor.callFromThread(function, *args)

    def call(self, method: str, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        """Call a :class:`Store` method by name in a store thread."""
        return self.run(getattr(self.store, method), *args, **kwargs)


class GroupWriter:
    """Group commit: writes asked for while a transaction runs go together in the next one.

    At low load each write is its own transaction, at once; under load (hundreds of calls
    ending together) one commit carries many writes, which is what lets a single SQLite
    writer keep up. Each caller still gets its own result or error (see
    :meth:`storage.store.Store.write_together`).

    The store thread takes the next batch as soon as it has committed one, without a round
    trip through the reactor: under load the reactor gets to a finished batch only after the
    I/O events ahead of it (10-15 ms at 1,000 calls/s), and every write asked for meanwhile
    would wait that long too. Results go back to the reactor batch by batch, in order. After
    ``max_run`` seconds of back-to-back batches the thread is handed back, so that other store
    calls queued for it (the pusher, the HTTP API) are not starved; the reactor then starts
    the writer again if writes are waiting.

    Under load the thread also gathers: when writes came in while it committed, and fewer
    than ``gather_min`` wait, it waits up to ``gather_wait`` seconds for more before it begins
    the next transaction. A transaction costs about 0.4 ms of CPU before its first write
    (begin, look-ups, commit and its fsync) and 0.05 ms per write after it, on the cores the
    calls themselves need: at 500 concurrent calls a wait of 2 ms took the median batch from
    3 writes to 10, and the calls' CPU and round trips down, the rating's write included
    (docs/performance.md). "Under load" is writes coming in at ``gather_rate`` per second or
    more (by default two per ``gather_wait``), measured over the last 50 ms or more: below
    that (50 concurrent calls) the wait would only add to the round trip, so every write goes
    at once, as does a write that finds the writer idle.
    """

    def __init__(
        self,
        store: DeferredStore,
        max_batch: int = 500,
        max_run: float = 0.05,
        gather_wait: float = 0.0,
        gather_min: int = 8,
        gather_rate: float | None = None,
    ) -> None:
        self._store = store
        self._max_batch = max_batch
        self._max_run = max_run
        self._gather_wait = gather_wait
        self._gather_min = min(gather_min, max_batch)
        self._gather_rate = gather_rate if gather_rate is not None else 2 / gather_wait if gather_wait else 0.0
        self._arrived = 0  # writes asked for since the start
        self._rate = 0.0  # writes per second over the last window (see _arrival_rate)
        self._rate_since = time.monotonic()
        self._rate_count = 0
        self._lock = threading.Lock()  # all of the above that changes, shared with the store thread
        self._more = threading.Condition(self._lock)  # enough writes to stop gathering
        self._pending: list[tuple[str, dict[str, Any], defer.Deferred[Any]]] = []
        self._running = False
        self._gathering = False

    def write(self, name: str, **kwargs: Any) -> defer.Deferred[Any]:
        """Run ``Store.tx_<name>(connection, **kwargs)`` in the next group transaction."""
        deferred: defer.Deferred[Any] = defer.Deferred()
        with self._lock:
            self._pending.append((name, kwargs, deferred))
            self._arrived += 1
            if self._running:
                if self._gathering and len(self._pending) >= self._gather_min:
                    self._more.notify()
                return deferred
            self._running = True
        self._start()
        return deferred

    def _start(self) -> None:
        self._store.run(self._drain).addCallbacks(self._drained, self._crashed)

    def _drain(self) -> bool:
        """In the store thread: write batches until none is waiting; True if stopped by ``max_run``."""
        deadline = time.monotonic() + self._max_run
        committed = False  # the first batch goes at once: the writer was idle
        while True:
            with self._lock:
                if (
                    committed
                    and self._gather_wait
                    and 0 < len(self._pending) < self._gather_min
                    and self._arrival_rate() >= self._gather_rate
                ):
                    self._gathering = True
                    self._more.wait_for(lambda: len(self._pending) >= self._gather_min, self._gather_wait)
                    self._gathering = False
                batch, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch :]
                if not batch:
                    self._running = False
                    return False
            try:
                results = self._store.store.write_together([(name, kwargs) for name, kwargs, _ in batch])
            except Exception:
                self._store.call_from_thread(self._fail, batch, Failure())
            else:
                self._store.call_from_thread(self._deliver, batch, results)
            committed = True
            if time.monotonic() >= deadline:
                return True

    def _arrival_rate(self) -> float:
        """Writes per second over the last window of at least ``RATE_WINDOW`` (under ``_lock``)."""
        now = time.monotonic()
        if now - self._rate_since >= RATE_WINDOW:
            self._rate = (self._arrived - self._rate_count) / (now - self._rate_since)
            self._rate_since, self._rate_count = now, self._arrived
        return self._rate

    def _drained(self, stopped_early: bool) -> None:
        if stopped_early:  # still _running: no one else has started the writer
            self._start()

    def _crashed(self, failure: Failure) -> None:
        if failure.check(StoreStopped):  # nothing will run them: each caller hears so now
            with self._lock:
                batch, self._pending = self._pending, []
                self._running = False
            self._fail(batch, failure)
            return
        log.error("event=store.group_writer_crashed error=%s", failure.type.__name__)  # pragma: no cover
        with self._lock:
            self._running = bool(self._pending)
        if self._running:
            self._start()

    @staticmethod
    def _deliver(batch: list[tuple[str, dict[str, Any], defer.Deferred[Any]]], results: list[Any]) -> None:
        for (_, _, deferred), result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                deferred.errback(Failure(result))
            else:
                deferred.callback(result)

    @staticmethod
    def _fail(batch: list[tuple[str, dict[str, Any], defer.Deferred[Any]]], failure: Failure) -> None:
        for _, _, deferred in batch:
            deferred.errback(failure)
