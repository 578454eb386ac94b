"""The pusher: outbox rows to the central platform, within seconds, exactly once as it sees them.

A Twisted service (SPEC R7.1, R7.2). Workers claim due outbox rows in batches (a lease, so
that several instances on one PostgreSQL never push the same record at once), map them with
:mod:`gateway.platform.records` in a store thread, post them signed, and settle each record
by the platform's answer as :mod:`gateway.platform.policy` judges it. A record is marked
pushed only when the platform acknowledges it; rejected ones are set aside with the reason.
When the platform fails, the pusher as a whole backs off (capped, jittered, Retry-After
honoured) and releases its claims; records keep no timers of their own, so a backlog flows at
full speed as soon as the platform answers again. A commit in this process that writes to the
outbox wakes the pusher at once (:meth:`Pusher.wake`); ratings stored by other processes are
found by polling: every 250 ms when idle, every 50 ms for a while after work. Every timer runs
on the injected clock.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import socket
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import event
from twisted.application import service
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads, IReactorTime
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from zope.interface import implementer

from gateway.config import Config
from gateway.platform.policy import (
    Acknowledged,
    Backoff,
    RejectAlone,
    RetryLater,
    Split,
    Verdict,
    halves,
    judge,
    parse_retry_after,
)
from gateway.platform.records import (
    MAX_BATCH_RECORDS,
    MAX_BODY_BYTES,
    CaseFacts,
    batch_body,
    batch_overhead,
    case_record,
    encode_record,
    evaluation_record,
    new_nonce,
    records_that_fit,
    signed_headers,
)
from storage.outbox import Outbox, OutboxItem
from storage.store import Store

log = logging.getLogger("gateway.platform")

Prepared = list[tuple[str, bytes]]  # (recordId, the record as JSON)


# -- the HTTP adapter ----------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    body: bytes
    retry_after: str | None = None


class PlatformClientLike(Protocol):
    def post_batch(self, body: bytes) -> defer.Deferred[HttpAnswer]: ...


@implementer(IBodyProducer)
class _Body:
    """A request body already in memory, written at once (no cooperator, no global reactor)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> defer.Deferred[None]:
        consumer.write(self.body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _BodyCollector(protocol.Protocol):
    def __init__(self, finished: defer.Deferred[bytes]) -> None:
        self.finished = finished
        self.parts: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.parts.append(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.finished.called:
            return
        # PotentialDataLoss: a body without a length, ended by closing the connection (legal
        # HTTP/1.1). It is the whole answer; refusing it would push the same records forever.
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self.parts))
        else:
            self.finished.errback(reason)


def _read_body(response: IResponse) -> defer.Deferred[bytes]:
    """The whole body; cancelling (a timeout) closes the connection."""
    collector: _BodyCollector

    def cancel(_: defer.Deferred[bytes]) -> None:
        if collector.transport is not None:
            collector.transport.stopProducing()

    finished: defer.Deferred[bytes] = defer.Deferred(cancel)
    collector = _BodyCollector(finished)
    response.deliverBody(collector)
    return finished


class PlatformClient:
    """Signed requests to the platform over Twisted's HTTP client (PLATFORM.md Transport).

    Every request gets a fresh nonce and timestamp; an answer not complete within
    ``timeout`` seconds is abandoned (the connection is dropped) and fails.
    """

    def __init__(
        self,
        reactor: Any,
        base_url: str,
        app_id: str,
        secret: str,
        timeout: float,
        *,
        connections: int = 4,
        nonce: Callable[[], str] = new_nonce,
    ) -> None:
        self._reactor = reactor
        self.base_url = base_url.rstrip("/")
        self.app_id = app_id
        self._secret = secret
        self.timeout = timeout
        self._nonce = nonce
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = connections
        self._agent = Agent(reactor, connectTimeout=timeout, pool=self._pool)

    def post_batch(self, body: bytes) -> defer.Deferred[HttpAnswer]:
        return self.request(b"POST", "/evaluations/batch", body)

    def reconciliation(self, day: str) -> defer.Deferred[HttpAnswer]:
        return self.request(b"GET", f"/reconciliation?date={day}", b"")

    def request(self, method: bytes, path: str, body: bytes) -> defer.Deferred[HttpAnswer]:
        timestamp_ms = int(self._reactor.seconds() * 1000)
        headers = Headers({b"User-Agent": [b"hcp-gateway"]})
        for name, value in signed_headers(
            self.app_id, self._secret, body, timestamp_ms=timestamp_ms, nonce=self._nonce()
        ).items():
            headers.addRawHeader(name, value)
        producer = None
        if method == b"POST":
            headers.addRawHeader("Content-Type", "application/json; charset=utf-8")
            producer = _Body(body)
        url = (self.base_url + path).encode()
        deferred = self._agent.request(method, url, headers, producer)
        deferred.addCallback(self._read)
        deferred.addTimeout(self.timeout, self._reactor)
        return deferred

    @staticmethod
    def _read(response: IResponse) -> defer.Deferred[HttpAnswer]:
        retry_after = response.headers.getRawHeaders(b"retry-after")

        def answer(body: bytes) -> HttpAnswer:
            return HttpAnswer(response.code, body, retry_after[0].decode("latin-1") if retry_after else None)

        return _read_body(response).addCallback(answer)

    def close(self) -> defer.Deferred[None]:
        return self._pool.closeCachedConnections()


# -- the service ---------------------------------------------------------------------------------


class StoreRunner(Protocol):
    """What the pusher needs of :class:`storage.deferred.DeferredStore`: the store, and threads."""

    store: Store

    def run(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]: ...


def platform_record(item: OutboxItem) -> dict[str, Any]:
    """The record to push for an outbox row; its recordId is the outbox's, the idempotency key."""
    if item.facts is None:
        raise LookupError("its rating or case is no longer in the store")
    facts = item.facts
    record = case_record(facts) if isinstance(facts, CaseFacts) else evaluation_record(facts)
    record["recordId"] = item.record_id
    return record


def instance_name() -> str:
    """Who holds a lease: host, process and a random part (a restarted process is another owner)."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(4)}"


@dataclass
class PushStats:
    """Counters for the health report and metrics."""

    pushed: int = 0
    duplicates_seen: int = 0
    rejected: int = 0
    requests: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    last_success: float | None = None
    last_failure: float | None = None
    last_error: str | None = None
    by_status: dict[str, int] = field(default_factory=dict)


class Pusher(service.Service):
    """Pushes the outbox to the platform (SPEC R7.1, R7.2)."""

    name = "pusher"

    def __init__(
        self,
        store: StoreRunner,
        client: PlatformClientLike,
        clock: IReactorTime,
        *,
        app_id: str,
        batch_size: int = MAX_BATCH_RECORDS,
        timeout: float = 10.0,
        owner: str | None = None,
        workers: int = 2,
        idle_poll: float = 0.25,
        busy_poll: float = 0.05,
        busy_window: float = 5.0,
        backoff: Backoff | None = None,
        jitter: Callable[[], float] = random.random,
        max_body_bytes: int = MAX_BODY_BYTES,
        commits_from: IReactorFromThreads | None = None,
    ) -> None:
        self.store = store
        self.outbox = Outbox(store.store)
        self.client = client
        self.clock = clock
        self.app_id = app_id
        self.batch_size = max(1, min(batch_size, MAX_BATCH_RECORDS))
        self.owner = owner or instance_name()
        # A lease outlives several requests; it is renewed while a claimed batch is being split.
        self.lease = max(60.0, 4 * timeout)
        self.workers = workers
        self.idle_poll = idle_poll
        self.busy_poll = busy_poll
        self.busy_window = busy_window
        self.backoff = backoff or Backoff()
        self._store_backoff = Backoff(initial=idle_poll, maximum=30.0)
        self._jitter = jitter
        self.max_body_bytes = max_body_bytes
        self.stats = PushStats()
        self._paused_until = 0.0
        self._last_work = -1e9
        self._loops: list[defer.Deferred[None]] = []
        self._sleeps: dict[defer.Deferred[None], tuple[IDelayedCall, bool]] = {}
        self._woken = False
        self._commits_from = commits_from
        self._listeners: list[tuple[str, Callable[..., None]]] = []
        #: Called with (seconds, outcome) after every POST: the HTTP status, or "error" (metrics).
        self.request_observers: list[Callable[[float, str], None]] = []

    # -- service -------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        log.info(
            "event=platform.pusher_start owner=%s batch_size=%d workers=%d", self.owner, self.batch_size, self.workers
        )
        if self._commits_from is not None:
            self._watch_commits(self._commits_from)
        self._loops = [defer.ensureDeferred(self._work(n)) for n in range(self.workers)]

    def stopService(self) -> defer.Deferred[None]:
        """Stop claiming; the requests in flight finish (or time out) and settle first."""
        super().stopService()
        engine = self.store.store.engine
        for name, listener in self._listeners:
            event.remove(engine, name, listener)
        self._listeners = []
        for sleeping in list(self._sleeps):
            self._end_sleep(sleeping)
        done = defer.DeferredList(self._loops, consumeErrors=True)

        def close(_: Any) -> Any:
            closing = getattr(self.client, "close", None)
            return closing() if closing else None

        return done.addCallback(close).addCallback(lambda _: None)

    def wake(self) -> None:
        """New records are in the outbox: look at once, not at the next poll (SPEC R7.1)."""
        self._last_work = self.clock.seconds()
        self._woken = True
        for sleeping, (_, wakeable) in list(self._sleeps.items()):
            if wakeable:
                self._end_sleep(sleeping)

    def _watch_commits(self, reactor: IReactorFromThreads) -> None:
        """Wake on every commit of this process that wrote outbox rows (any channel's writer).

        Ratings stored by other processes (another instance, ``gateway import``) are found by
        polling. A statement's text is all that is looked at: no cost to speak of per write.
        """

        def executed(connection: Any, cursor: Any, statement: str, *args: Any) -> None:
            if statement.startswith("INSERT INTO outbox"):
                connection.info["hcp_outbox_written"] = True

        def committed(connection: Any) -> None:
            if connection.info.pop("hcp_outbox_written", False):
                reactor.callFromThread(self.wake)

        def rolled_back(connection: Any) -> None:
            connection.info.pop("hcp_outbox_written", None)

        engine = self.store.store.engine
        self._listeners = [("after_cursor_execute", executed), ("commit", committed), ("rollback", rolled_back)]
        for name, listener in self._listeners:
            event.listen(engine, name, listener)

    def state(self) -> dict[str, Any]:
        """The pusher's state for the health report: platform reachability, last success and failure."""
        backing_off = self._paused_until > self.clock.seconds()
        return {
            "status": "backing_off" if backing_off else "ok",
            "pushed": self.stats.pushed,
            "rejected": self.stats.rejected,
            "requests": self.stats.requests,
            "consecutiveFailures": self.stats.consecutive_failures,
            "lastSuccess": _iso(self.stats.last_success),
            "lastFailure": _iso(self.stats.last_failure),
            "lastError": self.stats.last_error,
        }

    # -- timers --------------------------------------------------------------------------------

    def _sleep(self, seconds: float, *, wakeable: bool) -> defer.Deferred[None]:
        sleeping: defer.Deferred[None] = defer.Deferred()
        call = self.clock.callLater(max(seconds, 0.0), self._end_sleep, sleeping)
        self._sleeps[sleeping] = (call, wakeable)
        return sleeping

    def _end_sleep(self, sleeping: defer.Deferred[None]) -> None:
        call, _ = self._sleeps.pop(sleeping, (None, False))
        if call is not None and call.active():
            call.cancel()
        if not sleeping.called:
            sleeping.callback(None)

    def _poll_interval(self) -> float:
        recent = self.clock.seconds() - self._last_work < self.busy_window
        return self.busy_poll if recent else self.idle_poll

    def _pause(self, seconds: float) -> None:
        self._paused_until = max(self._paused_until, self.clock.seconds() + seconds)

    # -- the loop ------------------------------------------------------------------------------

    async def _work(self, number: int) -> None:
        while self.running:
            wait = self._paused_until - self.clock.seconds()
            if wait > 0:
                await self._sleep(wait, wakeable=False)
                continue
            try:
                prepared = await self.store.run(self._claim)
            except Exception as error:
                delay = self._store_backoff.failure(self._jitter())
                log.warning(
                    "event=platform.store_error worker=%d error=%s retry_in=%.1f", number, type(error).__name__, delay
                )
                self._pause(delay)
                continue
            self._store_backoff.success()
            if not prepared:
                if self._woken:  # woken while busy: look again before sleeping
                    self._woken = False
                    continue
                await self._sleep(self._poll_interval(), wakeable=True)
                continue
            self._last_work = self.clock.seconds()
            try:
                await self._push(prepared)
            except Exception as error:  # a bug must not stop the pusher; leases expire by themselves
                log.error("event=platform.push_error worker=%d error=%s", number, type(error).__name__, exc_info=True)
                self._pause(self.backoff.failure(self._jitter()))

    def _claim(self) -> Prepared:
        """In a store thread: lease due rows and encode their records."""
        items = self.outbox.claim(self.owner, self.batch_size, lease=self.lease)
        prepared: Prepared = []
        broken: dict[str, str] = {}
        for item in items:
            try:
                prepared.append((item.record_id, encode_record(platform_record(item))))
            except Exception as error:  # set aside, so that one record never blocks the queue
                broken[item.record_id] = f"gateway: cannot build the record ({type(error).__name__}: {error})"
        if broken:
            self.outbox.mark_rejected(broken)
            for record_id in broken:
                log.error("event=platform.unmappable record_id=%s", record_id)
        return prepared

    def _parts(self, prepared: Prepared) -> list[Prepared]:
        """The claimed records as bodies of ≤ 500 records and ≤ 1 MiB (PLATFORM.md)."""
        overhead = batch_overhead(self.app_id, str(uuid.uuid4()))
        parts: list[Prepared] = []
        rest = prepared
        while rest:
            count = records_that_fit(
                (len(encoded) for _, encoded in rest),
                overhead,
                max_records=self.batch_size,
                max_bytes=self.max_body_bytes,
            )
            parts.append(rest[:count])
            rest = rest[count:]
        return parts

    async def _push(self, prepared: Prepared) -> None:
        """Send the claimed records; a refused batch is halved until the record at fault is alone.

        A record refused alone with the platform's own answer (JSON) is set aside. One refused
        alone by a page that is not the platform's (a proxy's HTML 400, a wrong URL) is set
        aside only once another batch of the round went through: such a page may refuse every
        record alike, and nothing would ever push them again (R7.2). Until then it is a
        suspect, decided when the round ends; if nothing was taken, the suspects stay pending
        and the pusher backs off, as for any failure, saying to check the URL.
        """
        claimed_at = self.clock.seconds()
        queue: deque[Prepared] = deque(self._parts(prepared))
        suspects: list[tuple[str, Prepared, str]] = []  # (batch id, the record alone, the refusal)
        taken = False  # the platform acknowledged a batch in this round
        while queue:
            if not self.running:
                unsent = [p for _, part, _ in suspects for p in part] + [p for part in queue for p in part]
                await self._release(unsent, "the gateway is stopping", attempt=False)
                return
            if self.clock.seconds() - claimed_at > self.lease / 3:
                held = await self._renew([p[0] for part in queue for p in part] + [s[1][0][0] for s in suspects])
                kept = (list(p for p in part if p[0] in held) for part in queue)
                queue = deque(part for part in kept if part)
                suspects = [suspect for suspect in suspects if suspect[1][0][0] in held]
                claimed_at = self.clock.seconds()
                if not queue and not suspects:
                    return
                if not queue:
                    break
            part = queue.popleft()
            batch_id, verdict = await self._post(part)
            if isinstance(verdict, Acknowledged):
                taken = True
                await self._settle(batch_id, verdict)
            elif isinstance(verdict, Split):
                first, second = halves(part)
                queue.extendleft((second, first))
                log.warning("event=platform.split records=%d reason=refused_batch", len(part))
            elif isinstance(verdict, RejectAlone):
                if verdict.platform_said or taken:
                    await self._settle(batch_id, Acknowledged([], {part[0][0]: verdict.reason}, []))
                else:
                    suspects.append((batch_id, part, verdict.reason))
            else:
                unsent = [p for _, part, _ in suspects for p in part] + part + [p for rest in queue for p in rest]
                await self._retry_later(verdict, unsent)
                return
        if not suspects:
            return
        if taken:
            for batch_id, part, reason in suspects:
                await self._settle(batch_id, Acknowledged([], {part[0][0]: reason}, []))
            return
        reason = f"every record was refused, one by one too: {suspects[0][2]}"
        await self._retry_later(RetryLater(reason, misconfigured=True), [p for _, part, _ in suspects for p in part])

    async def _post(self, part: Prepared) -> tuple[str, Verdict]:
        batch_id = str(uuid.uuid4())
        ids = [record_id for record_id, _ in part]
        body = batch_body(self.app_id, batch_id, [encoded for _, encoded in part])
        self.stats.requests += 1
        started = self.clock.seconds()
        try:
            answer = await self.client.post_batch(body)
        except Exception as error:
            self._count("error", started)
            return batch_id, judge(ids, None, error=type(error).__name__)
        self._count(str(answer.status), started)
        return batch_id, judge(ids, answer.status, answer.body, parse_retry_after(answer.retry_after))

    def _count(self, status: str, started: float) -> None:
        self.stats.by_status[status] = self.stats.by_status.get(status, 0) + 1
        elapsed = max(self.clock.seconds() - started, 0.0)
        for observe in self.request_observers:
            observe(elapsed, status)

    async def _settle(self, batch_id: str, verdict: Acknowledged) -> None:
        failures = self.backoff.success()
        self.stats.consecutive_failures = 0
        self.stats.last_success = self.clock.seconds()
        if failures:
            log.info("event=platform.recovered after_failures=%d", failures)

        def settle() -> None:
            if verdict.done:
                self.outbox.mark_pushed(verdict.done, batch_id)
            if verdict.rejected:
                self.outbox.mark_rejected(verdict.rejected)
            if verdict.unanswered:
                self.outbox.release(self.owner, verdict.unanswered, error="not named in the platform's answer")

        await self.store.run(settle)
        self.stats.pushed += len(verdict.done)
        self.stats.rejected += len(verdict.rejected)
        for record_id in verdict.rejected:
            log.warning("event=platform.rejected record_id=%s batch=%s", record_id, batch_id)
        log.debug(
            "event=platform.pushed batch=%s acknowledged=%d rejected=%d unanswered=%d",
            batch_id,
            len(verdict.done),
            len(verdict.rejected),
            len(verdict.unanswered),
        )

    async def _retry_later(self, verdict: RetryLater, unsent: Prepared) -> None:
        delay = self.backoff.failure(self._jitter(), verdict.retry_after)
        self._pause(delay)
        self.stats.failures += 1
        self.stats.consecutive_failures += 1
        self.stats.last_failure = self.clock.seconds()
        self.stats.last_error = verdict.reason
        if verdict.auth:
            log.error(
                "event=platform.auth_refused retry_in=%.1f failures=%d detail=%r action=%s",
                delay,
                self.backoff.failures,
                verdict.reason,
                "check [platform] app_id and secret, and this host's clock",
            )
        elif verdict.misconfigured:
            log.error(
                "event=platform.bad_answer retry_in=%.1f detail=%r action=%s",
                delay,
                verdict.reason,
                "check [platform] url",
            )
        else:
            log.warning(
                "event=platform.retry retry_in=%.1f failures=%d records=%d detail=%r",
                delay,
                self.backoff.failures,
                len(unsent),
                verdict.reason,
            )
        await self._release(unsent, verdict.reason, attempt=True)

    async def _release(self, unsent: Prepared, error: str, *, attempt: bool) -> None:
        ids = [record_id for record_id, _ in unsent]
        try:
            await self.store.run(self.outbox.release, self.owner, ids, error=error, count_attempt=attempt)
        except Exception as failure:  # the lease expires by itself
            log.warning("event=platform.release_failed records=%d error=%s", len(ids), type(failure).__name__)

    async def _renew(self, ids: list[str]) -> set[str]:
        """Extend the lease of the records still to be sent; returns those still held."""
        held: set[str] = await self.store.run(self.outbox.renew, self.owner, ids, lease=self.lease)
        if len(held) < len(ids):
            log.warning("event=platform.lease_lost records=%d", len(ids) - len(held))
        return held


def _iso(seconds: float | None) -> str | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


def build_pusher(config: Config, reactor: Any, store: StoreRunner) -> Pusher:
    """The pusher of ``gateway run`` (``[platform]`` section), for :func:`gateway.app.build_gateway`."""
    platform = config.platform
    if not config.privacy.phone_hash_key:
        # Not refused: an installation that started without it has every phone hash (opt-outs
        # included, SPEC R3.8) under its generated key, and a new key would unlink them.
        log.warning(
            "event=platform.own_phone_hash_key detail=%r",
            "[privacy] phone_hash_key is not set: userPhoneHash is made with this installation's own key, "
            "which the platform cannot match (PLATFORM.md); set the shared key before the first start",
        )
    client = PlatformClient(reactor, platform.url, platform.app_id, platform.secret, platform.timeout)
    return Pusher(
        store,
        client,
        reactor,
        app_id=platform.app_id,
        batch_size=platform.batch_size,
        timeout=platform.timeout,
        commits_from=reactor,
    )
