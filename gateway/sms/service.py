"""The SMS channel in ``gateway run``: the scheduler, the durable sender and the incoming side.

Thin Twisted glue between :class:`storage.sms.SmsStore` (every decision that must survive a
restart, run in the store's threads) and the SMPP client (:mod:`gateway.sms.smpp`, its own I/O
thread). Nothing here blocks the reactor and nothing here is the only copy of a fact:

- the scheduler asks the store every ``interval`` seconds to invite newly completed records
  and to do the steps that are due (SPEC R3.1-R3.4);
- the sender leases queued messages, submits the parts not yet acknowledged, and hands each
  ``submit_sm_resp`` to the store in group commits; a message whose outcome is unknown (the link
  dropped) is released and its unacknowledged parts go again (SPEC R3.7);
- each incoming ``deliver_sm`` is stored (and, for a whole reply, acted on) before the client
  acknowledges it (SPEC R3.7a).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from twisted.application import service
from twisted.internet import defer, task
from twisted.python.failure import Failure

from gateway.config import Config
from gateway.sms.receipts import UnreadableReceipt, parse_receipt
from gateway.sms.settings import SmsSettings
from gateway.sms.smpp import (
    DeliverSm,
    NotSubmitted,
    SubmitOutcomeUnknown,
    SubmitPart,
    SubmitRejected,
    SubmitTimedOut,
)
from gateway.sms.text import IncomingPart, encode_ucs2_parts
from gateway.workdays import WorkingDayCalendar
from storage.deferred import DeferredStore
from storage.sms import Ack, OutgoingMessage, ReplyOutcome, ScanPosition, SmsStore
from storage.store import Store

log = logging.getLogger("gateway.sms")

#: Every ``MARGIN_EVERY`` rounds the scan for newly completed records reaches this far back
#: beyond the last one it saw, for transactions that committed late; other rounds start at the
#: last one seen, so that a bulk import is not read again every second for ten minutes.
SCAN_MARGIN = timedelta(minutes=10)
#: After a submit had no answer in time, its message waits this long times the time-outs so far.
TIMEOUT_PAUSE = timedelta(seconds=5)
MAX_TIMEOUTS_KEPT = 10_000
MARGIN_EVERY = 30


class SubmitClient(Protocol):
    """What the sender needs of :class:`gateway.sms.smpp.SmppClient`."""

    def submit(self, part: SubmitPart) -> defer.Deferred[str]: ...

    def state(self) -> dict[str, Any]: ...


@dataclass
class _InFlight:
    message: OutgoingMessage
    total: int
    outstanding: set[int]
    error: str | None = None
    permanent: bool = False  # the SMSC refused it for good: no retry (SPEC R3.7)
    unknown: bool = False
    timed_out: bool = False  # a part had no answer in time on a link that stayed up
    acks: list[Ack] = field(default_factory=list)


class SmsService(service.Service):
    name = "sms"

    def __init__(
        self,
        sms_store: SmsStore,
        deferred_store: DeferredStore,
        client: SubmitClient,
        reactor: Any,
        *,
        owner: str | None = None,
        interval: float = 1.0,
        lease: float = 120.0,
        max_in_flight: int = 1000,
        claim_batch: int = 500,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        self.sms_store = sms_store
        self.store = deferred_store
        self.client = client
        self.reactor = reactor
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:sms"
        self.interval = interval
        self.lease = lease
        self.max_in_flight = max_in_flight
        self.claim_batch = claim_batch
        self._now = now or (lambda: datetime.fromtimestamp(reactor.seconds(), UTC))
        self._watermark = ScanPosition(datetime(1970, 1, 1, tzinfo=UTC))
        self._look_back: ScanPosition | None = None  # where a look-back for late commits stands
        self._rounds = 0
        self._in_flight: dict[int, _InFlight] = {}
        self._timeouts: dict[int, int] = {}  # message id → submits that had no answer in time
        self._parts_in_flight = 0
        self._claiming = False
        self._pump_again = False
        self._acks: list[Ack] = []
        self._flushing: defer.Deferred[Any] | None = None
        self._scheduler: task.LoopingCall | None = None
        self._housekeeping: task.LoopingCall | None = None
        self._renewal: task.LoopingCall | None = None
        self._idle_poll: Any = None
        self._receipts: list[tuple[tuple[str, Any, str | None], defer.Deferred[Any]]] = []
        self._receipts_flushing = False
        self.counters = {"submitted": 0, "acknowledged": 0, "rejected": 0, "unknown": 0, "replies": 0, "receipts": 0}

    # -- lifecycle ------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if service.IService.providedBy(self.client):
            self.client.startService()
        self._scheduler = task.LoopingCall(self.run_schedule)
        self._scheduler.clock = self.reactor
        self._scheduler.start(self.interval, now=True).addErrback(self._loop_died, "scheduler")
        self._housekeeping = task.LoopingCall(self._tidy)
        self._housekeeping.clock = self.reactor
        self._housekeeping.start(60.0, now=False).addErrback(self._loop_died, "housekeeping")
        self._renewal = task.LoopingCall(self._renew_leases)
        self._renewal.clock = self.reactor
        self._renewal.start(self.lease / 3, now=False).addErrback(self._loop_died, "lease renewal")
        self.pump()

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        for loop in (self._scheduler, self._housekeeping, self._renewal):
            if loop is not None and loop.running:
                loop.stop()
        if self._idle_poll is not None and self._idle_poll.active():
            self._idle_poll.cancel()
        # The client's own stop resolves every submit; then the last acknowledgements are kept.
        if service.IService.providedBy(self.client):
            yield defer.maybeDeferred(self.client.stopService)
        yield self._flush_acks_now()

    def _loop_died(self, failure: Failure, name: str) -> None:
        log.error("event=sms.loop_failed loop=%s error=%s", name, failure.getErrorMessage())

    # -- the schedule (SPEC R3.1-R3.4) ------------------------------------------------------------

    @defer.inlineCallbacks
    def run_schedule(self) -> Any:
        """One scheduler round; errors are logged and the next round tries again."""
        try:
            now = self._now()
            self._rounds += 1
            seen = yield self.store.run(self.sms_store.create_invitations, self._watermark, now=now)
            self._watermark = max(self._watermark, seen)
            # Now and then, look back for records whose transactions committed late; a look-back
            # with more to read than a round takes goes on in the next rounds until it is done.
            if self._look_back is None and self._rounds % MARGIN_EVERY == 1:
                self._look_back = self._watermark.back(SCAN_MARGIN)
            if self._look_back is not None:
                reached = yield self.store.run(self.sms_store.create_invitations, self._look_back, now=now)
                done = reached == self._look_back or reached >= self._watermark
                self._watermark = max(self._watermark, reached)
                self._look_back = None if done else reached
            queued = 0
            while True:
                counts = yield self.store.run(self.sms_store.run_due_steps, now=now)
                queued += counts.invitations + counts.reminders
                if sum((counts.invitations, counts.reminders, counts.defaults, counts.deferred, counts.done)) < 500:
                    break
            if queued:
                log.info("event=sms.scheduled messages=%s", queued)
                self.pump()
            self._hold_bulk_in_quiet_hours(now)
        except Exception as exc:  # the store is down: the next round tries again
            log.warning("event=sms.schedule_failed error=%s", type(exc).__name__)

    def _hold_bulk_in_quiet_hours(self, now: datetime) -> None:
        """In the quiet hours (SPEC R3.2), bulk parts still waiting in the client go back to the store.

        Messages are claimed only outside the quiet hours, but parts claimed before them can
        wait in the client for a link that is down or throttled; given back, they wait for the
        morning in the store instead. Answers to a citizen's own message still go.
        """
        quiet = self.sms_store.settings.schedule.quiet_hours
        withdraw = getattr(self.client, "withdraw_bulk", None)
        if self._parts_in_flight and withdraw is not None and quiet is not None and quiet.contains(now):
            withdraw()

    def _tidy(self) -> defer.Deferred[Any]:
        now = self._now()
        d = self.store.run(self.sms_store.expire_incomplete_replies, now=now)
        d.addCallback(lambda _: self.store.run(self.sms_store.purge, now=now))
        d.addErrback(lambda f: log.warning("event=sms.tidy_failed error=%s", f.type.__name__))
        return d

    # -- sending (SPEC R3.1, R3.7) --------------------------------------------------------------

    def pump(self) -> None:
        """Claim and submit what is queued, as far as the in-flight limit allows."""
        if not self.running:
            return
        if self._claiming:
            self._pump_again = True
            return
        room = min(self.claim_batch, self.max_in_flight - self._parts_in_flight)
        # Claim in batches: waiting for half the room keeps a claim from costing a transaction
        # per message as acknowledgements trickle in.
        if room <= 0 or (self._parts_in_flight and room < min(self.claim_batch, self.max_in_flight) // 2):
            return
        self._claiming = True
        self._pump_again = False
        d = self.store.run(
            self.sms_store.claim_messages,
            self.owner,
            room,
            lease=self.lease,
            holding=tuple(self._in_flight),
            now=self._now(),
        )
        d.addCallbacks(self._submit_all, self._claim_failed, callbackArgs=(room,))

    def _renew_leases(self) -> defer.Deferred[Any] | None:
        """Keep the leases of the messages with parts in flight (a link down, a slow SMSC)."""
        if not self._in_flight:
            return None
        held = tuple(self._in_flight)
        d = self.store.run(self.sms_store.renew_leases, self.owner, held, lease=self.lease, now=self._now())

        def renewed(count: int) -> None:
            if count < len(held):  # failed by a receipt meanwhile, or the lease had run out already
                log.info("event=sms.lease_lost messages=%s", len(held) - count)

        d.addCallbacks(renewed, lambda f: log.warning("event=sms.lease_renewal_failed error=%s", f.type.__name__))
        return d

    def _claim_failed(self, failure: Failure) -> None:
        self._claiming = False
        log.warning("event=sms.claim_failed error=%s", failure.type.__name__)
        self._poll_later(5.0)

    def _submit_all(self, claimed: list[OutgoingMessage], room: int) -> None:
        self._claiming = False
        for message in claimed:
            self._submit(message)
        if len(claimed) == room or self._pump_again:
            self.reactor.callLater(0, self.pump)
        else:
            self._poll_later(self.interval)

    def _poll_later(self, delay: float) -> None:
        if self._idle_poll is None or not self._idle_poll.active():
            self._idle_poll = self.reactor.callLater(delay, self.pump)

    def _submit(self, message: OutgoingMessage) -> None:
        if message.id in self._in_flight:  # never: claims leave out what is held; never send twice
            log.error("event=sms.claimed_twice message=%s", message.id)
            return
        parts = encode_ucs2_parts(message.body, message.concat_ref)
        todo = [part for part in parts if _seq(part) not in message.acknowledged]
        if not todo:  # every part was acknowledged before a restart: only the status is missing
            self._timeouts.pop(message.id, None)
            self._acks.append(Ack(message.id, message.attempt, len(parts), len(parts), "", True))
            self._schedule_flush()
            return
        flight = _InFlight(message, len(parts), {_seq(part) for part in todo})
        self._in_flight[message.id] = flight
        for part in todo:
            self._parts_in_flight += 1
            self.counters["submitted"] += 1
            seq = _seq(part)
            d = self.client.submit(
                SubmitPart(
                    destination=message.destination,
                    source=message.source,
                    short_message=part.short_message,
                    esm_class=part.esm_class,
                    registered_delivery=1 if self.sms_store.settings.delivery_receipts else 0,
                    urgent=message.urgent,
                )
            )
            d.addCallbacks(self._acknowledged, self._refused, callbackArgs=(flight, seq), errbackArgs=(flight, seq))

    def _acknowledged(self, smsc_id: str, flight: _InFlight, seq: int) -> None:
        self.counters["acknowledged"] += 1
        flight.acks.append(Ack(flight.message.id, flight.message.attempt, seq, flight.total, str(smsc_id), False))
        self._part_done(flight, seq)

    def _refused(self, failure: Failure, flight: _InFlight, seq: int) -> None:
        if failure.check(SubmitRejected):
            self.counters["rejected"] += 1
            flight.error = getattr(failure.value, "name", None) or failure.getErrorMessage()
            flight.permanent = flight.permanent or bool(getattr(failure.value, "permanent", False))
        elif failure.check(SubmitTimedOut):
            self.counters["unknown"] += 1
            flight.unknown = flight.timed_out = True
        elif failure.check(SubmitOutcomeUnknown, NotSubmitted):
            self.counters["unknown"] += 1
            flight.unknown = True
        elif failure.check(ValueError):  # the part cannot be encoded (an address too long): never sent
            self.counters["rejected"] += 1
            flight.error = "unencodable"
        else:
            log.error("event=sms.submit_bug error=%s", failure.getErrorMessage())
            flight.unknown = True
        self._part_done(flight, seq)

    def _part_done(self, flight: _InFlight, seq: int) -> None:
        flight.outstanding.discard(seq)
        self._parts_in_flight -= 1
        if not flight.outstanding:
            self._in_flight.pop(flight.message.id, None)
            complete = flight.error is None and not flight.unknown
            if not flight.timed_out:
                self._timeouts.pop(flight.message.id, None)
            if flight.acks and complete:
                last = flight.acks[-1]
                flight.acks[-1] = Ack(last.message_id, last.attempt, last.seq, last.total, last.smsc_id, True)
            self._acks.extend(flight.acks)
            flight.acks = []
            if flight.error is not None:
                error = flight.error
                now = self._now()
                message = flight.message
                final = {message.id} if flight.permanent else set()
                self._after_flush(
                    lambda: self.sms_store.fail_attempts(
                        {message.id: error}, attempts={message.id: message.attempt}, now=now, final=final
                    )
                )
            elif flight.timed_out:
                self._timed_out(flight.message)
            elif flight.unknown:
                self._after_flush(lambda: self.sms_store.release_messages([flight.message.id], owner=self.owner))
            self.pump()
        elif flight.acks:
            # Keep each mapping as soon as it comes: a receipt may follow at once (SPEC R3.7).
            self._acks.extend(flight.acks)
            flight.acks = []
        self._schedule_flush()

    def _timed_out(self, message: OutgoingMessage) -> None:
        """A part had no answer in time: the SMSC is slow, or lost it; it may have taken it.

        The unanswered parts go again (never the acknowledged ones, R3.7), after a pause that
        grows with each time-out; after ``max_attempts`` time-outs the message is failed and
        reported. A slow SMSC thus gets a bounded number of copies, not one every timeout.
        """
        timeouts = self._timeouts.get(message.id, 0) + 1
        if timeouts >= self.sms_store.settings.max_attempts:
            self._timeouts.pop(message.id, None)
            error = f"no submit_sm_resp in time, {timeouts} times"
            now = self._now()
            self._after_flush(
                lambda: self.sms_store.fail_attempts(
                    {message.id: error}, attempts={message.id: message.attempt}, now=now, final={message.id}
                )
            )
            return
        self._timeouts[message.id] = timeouts
        if len(self._timeouts) > MAX_TIMEOUTS_KEPT:  # messages another instance took over, say
            del self._timeouts[next(iter(self._timeouts))]
        not_before = self._now() + TIMEOUT_PAUSE * timeouts
        log.warning("event=sms.submit_timed_out message=%s times=%s", message.id, timeouts)
        self._after_flush(
            lambda: self.sms_store.release_messages([message.id], owner=self.owner, not_before=not_before)
        )

    def _after_flush(self, work: Callable[[], Any]) -> None:
        """Run ``work`` in the store after the acknowledgements before it are kept."""
        d = self._flush_acks_now()
        d.addCallback(lambda _: self.store.run(work))
        d.addErrback(lambda f: log.warning("event=sms.settle_failed error=%s", f.type.__name__))

    def _schedule_flush(self) -> None:
        if self._acks and self._flushing is None:
            self._flushing = defer.Deferred()
            self.reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        batch, self._acks = self._acks, []
        waiting, self._flushing = self._flushing, None
        d = self.store.run(self.sms_store.record_acks, batch, now=self._now()) if batch else defer.succeed(0)

        def failed(failure: Failure) -> None:
            # Kept for the next flush: an acknowledged part is never forgotten while we run.
            log.warning("event=sms.ack_store_failed parts=%s error=%s", len(batch), failure.type.__name__)
            self._acks[:0] = batch
            self.reactor.callLater(1.0, self._schedule_flush)

        d.addErrback(failed)
        if waiting is not None:
            d.addBoth(lambda _: waiting.callback(None))
        self._schedule_flush()

    def _flush_acks_now(self) -> defer.Deferred[Any]:
        if self._flushing is None and not self._acks:
            return defer.succeed(None)
        if self._flushing is None:
            self._schedule_flush()
        assert self._flushing is not None
        done: defer.Deferred[Any] = defer.Deferred()
        self._flushing.addBoth(lambda _: done.callback(None))
        return done

    # -- incoming (SPEC R3.5-R3.8, R3.7a) ----------------------------------------------------------

    def on_deliver(self, pdu: DeliverSm) -> defer.Deferred[Any]:
        """Store (and act on) one ``deliver_sm``; the client acknowledges when this fires."""
        if pdu.is_receipt:
            self.counters["receipts"] += 1
            try:
                receipt = parse_receipt(
                    pdu.short_message,
                    receipted_message_id=pdu.receipted_message_id,
                    message_state=pdu.message_state,
                )
            except UnreadableReceipt as exc:
                # Kept for review, then acknowledged: sending it again would not make it readable.
                log.warning("event=sms.receipt_unreadable why=%s", exc)
                return self.store.run(self.sms_store.store_unreadable_receipt, pdu.short_message, now=self._now())
            waiter: defer.Deferred[Any] = defer.Deferred()
            self._receipts.append(((receipt.message_id, receipt.state, receipt.error), waiter))
            self._flush_receipts_soon()
            return waiter
        self.counters["replies"] += 1
        part = IncomingPart.from_pdu(
            pdu.source_addr,
            pdu.short_message,
            esm_class=pdu.esm_class,
            data_coding=pdu.data_coding,
            sar_msg_ref_num=pdu.sar_msg_ref_num,
            sar_total_segments=pdu.sar_total_segments,
            sar_segment_seqnum=pdu.sar_segment_seqnum,
        )
        concat = part.concatenation
        d = self.store.run(
            self.sms_store.store_reply,
            pdu.source_addr,
            pdu.destination_addr,
            part.payload,
            part.data_coding,
            concatenation=(concat.reference, concat.total, concat.sequence) if concat else None,
            now=self._now(),
        )

        def answered(outcome: ReplyOutcome) -> ReplyOutcome:
            if outcome.answered:
                self.pump()
            return outcome

        return d.addCallback(answered)

    def _flush_receipts_soon(self) -> None:
        if not self._receipts_flushing and self._receipts:
            self._receipts_flushing = True
            self.reactor.callLater(0, self._flush_receipts)

    def _flush_receipts(self) -> None:
        """Receipts come as fast as submits: they are kept in group commits, each acknowledged after."""
        batch, self._receipts = self._receipts[:2000], self._receipts[2000:]
        # A part's answer comes before its receipt on the wire: keeping the answers first means
        # the receipt finds its mapping, instead of waiting for it as unmatched (SPEC R3.7).
        d = self._flush_acks_now()
        d.addCallback(
            lambda _: self.store.run(self.sms_store.store_receipts, [item for item, _ in batch], now=self._now())
        )

        def kept(outcomes: list[str]) -> None:
            for (_, waiter), outcome in zip(batch, outcomes, strict=True):
                waiter.callback(outcome)

        def not_kept(failure: Failure) -> None:
            for _, waiter in batch:
                waiter.errback(failure)  # the SMSC hears ESME_RX_T_APPN and delivers it again

        def next_batch(_: Any) -> None:
            self._receipts_flushing = False
            self._flush_receipts_soon()

        d.addCallbacks(kept, not_kept).addBoth(next_batch)

    # -- operations -------------------------------------------------------------------------------

    def health(self) -> defer.Deferred[dict[str, Any]]:
        """The link's state and the sending queue's counts; failed messages are reported here (R3.7)."""

        def with_counts(counts: dict[str, int]) -> dict[str, Any]:
            return {**self.state(), "messages": counts}

        def without(failure: Failure) -> dict[str, Any]:
            return {**self.state(), "messages": None, "store_error": failure.type.__name__}

        return self.store.run(self.sms_store.queue_counts).addCallbacks(with_counts, without)

    def state(self) -> dict[str, Any]:
        link = self.client.state()
        return {
            "status": "ok" if link.get("bound") else "down",
            "bound": bool(link.get("bound")),
            "messages_in_flight": len(self._in_flight),
            "parts_in_flight": self._parts_in_flight,
            **{k: v for k, v in link.items() if k in ("window_in_use", "window", "rate", "last_error")},
        }


def _seq(part: Any) -> int:
    concatenation = getattr(part, "concatenation", None)
    return concatenation.sequence if concatenation is not None else 1


def build_sms_service(
    config: Config, reactor: Any, store: Store, deferred_store: DeferredStore, calendar: WorkingDayCalendar
) -> SmsService:
    """The SMS channel of ``gateway run``: the SMPP client, owned and stopped by the service."""
    from gateway.sms.smpp import SmppClient

    settings = SmsSettings.from_config(config)
    lease = 120.0
    # Never more in flight than the rate sends in a quarter of the lease, so a lease cannot
    # expire (and another instance send the same message) while its parts wait for their turn.
    in_flight = min(2000, max(config.smpp.window, int(config.smpp.rate * lease / 4)))
    sms: list[SmsService] = []
    client = SmppClient(config.smpp, reactor, lambda pdu: sms[0].on_deliver(pdu))
    sms.append(
        SmsService(
            SmsStore(store, settings, calendar), deferred_store, client, reactor, lease=lease, max_in_flight=in_flight
        )
    )
    return sms[0]
