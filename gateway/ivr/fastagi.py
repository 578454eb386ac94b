"""The FastAGI server: Asterisk's ``AGI(agi://host:4573/rating?...)`` served by Twisted.

A thin adapter around :class:`gateway.ivr.call.RatingCall`: bytes in, bytes out, store
writes through the group writer, one idle timer per call. Many calls share one thread; a
broken, stalled or oversized peer ends its own call and no other.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.exc import DataError, ProgrammingError
from twisted.application import internet
from twisted.internet import defer, protocol, task
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from gateway.config import Config
from gateway.ivr.call import Close, RatingCall, Write, describe
from gateway.ivr.dialogue import DialogueSettings, NotRated, StoreDetail, StoreRating
from gateway.ivr.settings import DETAIL_HOLD, details_may_follow, dialogue_settings
from storage import ids
from storage.deferred import DeferredStore, GroupWriter, StoreStopped

log = logging.getLogger("gateway.ivr.fastagi")

#: After the shutdown grace, how long an ended call's orderly close may take before it is reset.
SHUTDOWN_ABORT_AFTER = 5.0
#: Delays before retrying a failed store write; a key pressed is a rating stored (SPEC R2.4).
STORE_RETRY_DELAYS = (0.2, 1.0, 3.0)
#: Failures that would only repeat (a value the database refuses, a store stopped): no retry,
#: so the caller is not kept waiting seconds for the same answer.
NOT_RETRIED = (DataError, ProgrammingError, StoreStopped)
#: Writes that add a row: a retry first looks for the row its earlier try may have committed
#: (a connection lost during COMMIT); the other writes set values and may simply run again.
LOOKS_FOR_ITS_FIRST_TRY = frozenset({"call_rating"})


@dataclass
class CallStats:
    """Counters for the health report and metrics."""

    active: int = 0
    started: int = 0
    rated: int = 0
    not_rated: int = 0
    store_failures: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)


class RatingStore:
    """What a call needs from the store, with retries: write the rating, the details, the end."""

    def __init__(self, writer: GroupWriter, clock: IReactorTime) -> None:
        self.writer = writer
        self.clock = clock

    def write(self, name: str, **kwargs: Any) -> defer.Deferred[Any]:
        return self._attempt(name, kwargs, 0)

    def _attempt(self, name: str, kwargs: dict[str, Any], tries: int) -> defer.Deferred[Any]:
        if tries and name in LOOKS_FOR_ITS_FIRST_TRY:
            kwargs = {**kwargs, "retried": True}
        deferred = self.writer.write(name, **kwargs)
        if tries >= len(STORE_RETRY_DELAYS):
            return deferred

        def retry(failure: Failure) -> defer.Deferred[Any] | Failure:
            if failure.check(*NOT_RETRIED):
                return failure
            log.warning("event=agi.store_retry write=%s try=%d error=%s", name, tries + 1, failure.type.__name__)
            return task.deferLater(self.clock, STORE_RETRY_DELAYS[tries], self._attempt, name, kwargs, tries + 1)

        return deferred.addErrback(retry)


class FastAGIProtocol(protocol.Protocol):
    """One Asterisk AGI session."""

    def __init__(self, factory: FastAGIFactory) -> None:
        self.factory = factory
        self.call = RatingCall(factory.settings, max_line_length=factory.max_line_length)
        self.record_id: str | None = None
        self.push_held = False
        self._detail_writes: list[defer.Deferred[Any]] = []
        self.started = 0.0
        self._idle: IDelayedCall | None = None
        self._heard = 0.0  # when the peer last sent something (clock seconds)
        self._send_now: Callable[[bytes], int | BaseException] | None = None

    # -- Twisted events ------------------------------------------------------------------------

    def connectionMade(self) -> None:
        if not getattr(self.transport, "TLS", False):
            self._send_now = getattr(self.transport, "writeSomeData", None)
        self.factory.calls.add(self)
        self.started = time.monotonic()
        self.factory.stats.active += 1
        self.factory.stats.started += 1
        self._heard = self.factory.clock.seconds()
        self._idle = self.factory.clock.callLater(self.factory.idle_timeout, self._check_idle)

    def dataReceived(self, data: bytes) -> None:
        self._heard = self.factory.clock.seconds()
        self._carry_out(self.call.receive_data(data))

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.factory.stats.active -= 1
        self._cancel_idle()
        self._carry_out(self.call.lost())
        self.factory.call_ended(self)

    def shut_down(self) -> None:
        """The gateway stops and this call has run past the grace period: end it, recorded (R2.3)."""
        log.warning("event=agi.call_cut call_id=%s why=shutdown", self.call.call_id)
        self._carry_out(self.call.shut_down())  # closes now, or once a rating being stored is in

    # -- carrying out the call's outputs -------------------------------------------------------

    def _carry_out(self, outputs: list[Any]) -> None:
        for output in outputs:
            if isinstance(output, Write):
                self._write(output.data)
            elif isinstance(output, StoreRating):
                self._store_rating(output)
            elif isinstance(output, StoreDetail):
                self._store_detail(output)
            elif isinstance(output, Close):
                self._finish(output)

    def _store_rating(self, action: StoreRating) -> None:
        rated_at = datetime.fromtimestamp(self.factory.clock.seconds(), UTC)
        self.push_held = details_may_follow(self.factory.settings, action.level)
        deferred = self.factory.store.write(
            "call_rating",
            record_id=ids.new_id("ev"),  # chosen here, so that a retry finds its first try (R1.4)
            hand_off=self.call.hand_off,
            level=action.level,
            key=action.key,
            rated_at=rated_at,
            push_after=rated_at + DETAIL_HOLD if self.push_held else None,
        )

        def stored(result: tuple[str, bool]) -> None:
            self.record_id, counted = result
            if not counted:
                log.info("event=agi.rating_attempt call_id=%s counted=false", self.call.call_id)
            self._carry_out(self.call.store_done())

        def failed(failure: Failure) -> None:
            self.factory.stats.store_failures += 1
            log.error("event=agi.store_failed call_id=%s error=%s", self.call.call_id, failure.type.__name__)
            self._carry_out(self.call.store_failed(failure.type.__name__))

        self._track(deferred.addCallbacks(stored, failed))

    def _store_detail(self, action: StoreDetail) -> None:
        if self.record_id is None:
            return
        reasons = action.reason
        deferred = self.factory.store.write(
            "rating_detail", record_id=self.record_id, reasons=reasons, comment_ref=action.comment_ref
        )
        deferred.addErrback(self._log_failure, "rating_detail")
        self._detail_writes.append(deferred)
        self._track(deferred)

    def _finish(self, close: Close) -> None:
        self._cancel_idle()
        outcome = close.outcome
        stats = self.factory.stats
        label = describe(outcome)
        kind = f"not_rated/{outcome.reason}" if isinstance(outcome, NotRated) else ("rated" if outcome else "none")
        stats.outcomes[kind] = stats.outcomes.get(kind, 0) + 1
        if isinstance(outcome, NotRated):
            stats.not_rated += 1
            if self.call.call_id:
                deferred = self.factory.store.write("unrated_call", hand_off=self.call.hand_off, reason=outcome.reason)
                self._track(deferred.addErrback(self._log_failure, "unrated_call"))
        elif outcome is not None:
            if self.push_held and self.record_id:
                # After the details are in (retries included): the push must carry them (R2.5).
                record_id = self.record_id
                details = defer.DeferredList(self._detail_writes, consumeErrors=True)
                deferred = details.addCallback(lambda _: self.factory.store.write("release_push", record_id=record_id))
                self._track(deferred.addErrback(self._log_failure, "release_push"))
            stats.rated += 1
        log.info(
            "event=agi.call_end call_id=%s %s ms=%d%s",
            self.call.call_id,
            label,
            (time.monotonic() - self.started) * 1000,
            f" problem={close.problem!r}" if close.problem else "",
        )
        if self.transport is not None:
            self.transport.loseConnection()

    # -- helpers -------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        """Send a command at once, with one ``send()``, while nothing waits in Twisted's buffer.

        ``transport.write`` only buffers: it asks the reactor to watch the socket for
        writability, and the bytes leave on the next turn of the loop, with two ``epoll_ctl``
        calls per command. A command is a few dozen bytes for a socket that has nothing else to
        send, so it nearly always goes out whole. What is not sent (a full socket buffer, a lost
        connection), and everything after it, goes through ``transport.write``, in order, and
        Twisted handles the rest as usual.
        """
        send = self._send_now
        if send is not None:
            sent = send(data)
            if sent == len(data):
                return
            self._send_now = None
            if isinstance(sent, int):
                data = data[sent:]
        self.transport.write(data)

    def _track(self, deferred: defer.Deferred[Any]) -> None:
        self.factory.pending.add(deferred)
        deferred.addBoth(self._untrack, deferred)

    def _untrack(self, result: Any, deferred: defer.Deferred[Any]) -> Any:
        self.factory.pending.discard(deferred)
        return result

    def _log_failure(self, failure: Failure, what: str) -> None:
        self.factory.stats.store_failures += 1
        log.error("event=agi.store_failed call_id=%s write=%s error=%s", self.call.call_id, what, failure.type.__name__)

    def _check_idle(self) -> None:
        """The idle timer: one per call, moved on only when it fires, not at every answer."""
        quiet_for = self.factory.clock.seconds() - self._heard
        if quiet_for < self.factory.idle_timeout:
            self._idle = self.factory.clock.callLater(self.factory.idle_timeout - quiet_for, self._check_idle)
        else:
            self._stalled()

    def _cancel_idle(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None

    def _stalled(self) -> None:
        self._idle = None
        log.warning("event=agi.peer_stalled call_id=%s", self.call.call_id)
        self._carry_out(self.call.stalled())
        if self.transport is not None:
            self.transport.abortConnection()  # a stalled peer may never read a FIN


class FastAGIFactory(protocol.ServerFactory):
    """Builds one :class:`FastAGIProtocol` per Asterisk connection."""

    noisy = False

    def __init__(
        self,
        settings: DialogueSettings,
        store: RatingStore,
        clock: IReactorTime,
        *,
        idle_timeout: float = 120.0,
        max_line_length: int = 8192,
    ) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.max_line_length = max_line_length
        self.stats = CallStats()
        self.pending: set[defer.Deferred[Any]] = set()
        self.calls: set[FastAGIProtocol] = set()
        self._all_ended: list[defer.Deferred[None]] = []

    def buildProtocol(self, addr: Any) -> FastAGIProtocol:
        return FastAGIProtocol(self)

    def call_ended(self, call: FastAGIProtocol) -> None:
        self.calls.discard(call)
        if not self.calls:
            waiting, self._all_ended = self._all_ended, []
            for deferred in waiting:
                deferred.callback(None)

    def drain(self, grace: float) -> defer.Deferred[None]:
        """Fires when every call has ended: on its own within ``grace`` seconds, else ended by us.

        A call ended by us is recorded as not rated (reason ``error``) unless its key was
        received, and its rating is still written (R2.4); Asterisk's dialplan goes on.
        """
        if not self.calls:
            return defer.succeed(None)
        ended: defer.Deferred[None] = defer.Deferred()
        self._all_ended.append(ended)
        log.info("event=agi.draining calls=%d grace_s=%s", len(self.calls), grace)

        timers: list[IDelayedCall] = []

        def cut() -> None:
            for call in list(self.calls):
                call.shut_down()
            if self.calls:  # a peer that stopped reading never lets an orderly close finish
                timers.append(self.clock.callLater(SHUTDOWN_ABORT_AFTER, abort))

        def abort() -> None:
            for call in list(self.calls):
                log.warning("event=agi.call_aborted call_id=%s why=shutdown", call.call.call_id)
                if call.transport is not None:
                    call.transport.abortConnection()

        def cancel_timers(result: Any) -> Any:
            for timer in timers:
                if timer.active():
                    timer.cancel()
            return result

        timers.append(self.clock.callLater(grace, cut))
        ended.addBoth(cancel_timers)
        return ended


class FastAGIService(internet.TCPServer):
    """The listener; stopping it stops accepting, lets the calls end, and waits for their writes.

    The calls in progress get ``shutdown_grace`` seconds to end on their own; those still
    running are then ended by the gateway (recorded as not rated, or rated if the key came).
    Only then do their store writes finish and the store stop (``SequentialMultiService``).
    """

    def __init__(
        self, port: int, factory: FastAGIFactory, interface: str, backlog: int, *, shutdown_grace: float = 30.0
    ) -> None:
        super().__init__(port, factory, interface=interface, backlog=backlog)
        self.factory = factory
        self.shutdown_grace = shutdown_grace
        self.setName("agi")

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        yield super().stopService()
        yield self.factory.drain(self.shutdown_grace)
        while self.factory.pending:
            yield defer.DeferredList(list(self.factory.pending), consumeErrors=True)


def build_fastagi_service(config: Config, reactor: Any, store: DeferredStore) -> FastAGIService:
    factory = FastAGIFactory(
        dialogue_settings(config),
        RatingStore(
            GroupWriter(store, gather_wait=config.store.group_commit_wait, gather_min=config.store.group_commit_min),
            reactor,
        ),
        reactor,
        idle_timeout=config.agi.idle_timeout,
    )
    return FastAGIService(
        config.agi.port, factory, config.agi.host, config.agi.backlog, shutdown_grace=config.agi.shutdown_grace
    )
