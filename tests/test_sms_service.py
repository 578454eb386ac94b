"""The SMS service's decisions, with ``task.Clock`` and a scripted SMPP client.

The store is real (SQLite, run synchronously here so that each step can be looked at); the
client is a stand-in that records each submitted part and lets the test answer it. The real
client against real SMSCs is in tests/test_sms_end_to_end.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select
from twisted.internet import defer
from twisted.internet.task import Clock

from gateway.intake import ServiceRecordInput
from gateway.rating import ServiceKind
from gateway.sms.schedule import ScheduleSettings
from gateway.sms.service import SmsService
from gateway.sms.settings import SmsSettings
from gateway.sms.smpp import DeliverSm, NotSubmitted, SubmitOutcomeUnknown, SubmitPart, SubmitRejected, SubmitTimedOut
from gateway.sms.text import split_udh
from gateway.workdays import WorkingDayCalendar
from storage.schema import message_parts, messages, ratings, sms_inbox
from storage.sms import SmsStore
from storage.store import Store

START = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)  # 10:00 in Shanghai, a Tuesday


class ScriptedClient:
    """Records submits; the test answers them."""

    def __init__(self) -> None:
        self.sent: list[tuple[SubmitPart, defer.Deferred[str]]] = []

    def submit(self, part: SubmitPart) -> defer.Deferred[str]:
        d: defer.Deferred[str] = defer.Deferred()
        self.sent.append((part, d))
        return d

    def state(self) -> dict[str, Any]:
        return {"bound": True, "window_in_use": 0, "window": 10, "rate": 50.0}

    def withdraw_bulk(self) -> None:
        """As the real client: bulk parts not answered yet fail with NotSubmitted."""
        kept = []
        for part, d in self.sent:
            if part.urgent:
                kept.append((part, d))
            else:
                d.errback(NotSubmitted("withdrawn"))
        self.sent = kept

    def answer_all(self, prefix: str = "id") -> None:
        waiting, self.sent = self.sent, []
        for n, (_, d) in enumerate(waiting):
            d.callback(f"{prefix}{n}")


class SyncStore:
    """DeferredStore's interface, run at once: the test sees each step's effect immediately."""

    def run(self, function: Any, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        return defer.maybeDeferred(function, *args, **kwargs)


@pytest.fixture
def harness(sqlite_store: Store) -> tuple[SmsService, ScriptedClient, Clock, Store]:
    clock = Clock()
    clock.advance(START.timestamp())
    settings = SmsSettings(schedule=ScheduleSettings(invite_delay=timedelta(0)))
    sms_store = SmsStore(sqlite_store, settings, WorkingDayCalendar())
    client = ScriptedClient()
    service = SmsService(sms_store, SyncStore(), client, clock)  # type: ignore[arg-type]
    return service, client, clock, sqlite_store


def completed(store: Store, record_id: str, at: datetime = START, phone: str = "+8613800138000") -> None:
    store.upsert_service_records(
        [ServiceRecordInput(id=record_id, kind=ServiceKind.MATTER, completed_at=at, mobile=phone, matter_name="社保")]
    )


def table(store: Store, t: Any) -> list[Any]:
    with store.engine.connect() as connection:
        return connection.execute(select(t).order_by(t.c.id)).mappings().all()


def test_an_invitation_is_submitted_in_parts_and_kept_as_acknowledged(harness: Any) -> None:
    service, client, clock, store = harness
    completed(store, "M-1")
    service.startService()
    clock.advance(0)
    parts = [part for part, _ in client.sent]
    assert len(parts) == 2  # the invitation is longer than 70 characters (SPEC R3.1)
    udhs = [split_udh(part.short_message)[0] for part in parts]
    assert [(u.total, u.sequence) for u in udhs] == [(2, 1), (2, 2)]  # type: ignore[union-attr]
    assert len({u.reference for u in udhs}) == 1  # type: ignore[union-attr]
    assert all(part.esm_class == 0x40 and part.data_coding == 8 for part in parts)
    assert parts[0].destination == "13800138000" and parts[0].source.startswith("10690012345")
    assert table(store, messages)[0]["status"] == "queued"  # not sent until the SMSC says so
    client.answer_all()
    clock.advance(0)
    assert table(store, messages)[0]["status"] == "submitted"
    assert [p["smsc_id"] for p in table(store, message_parts)] == ["id0", "id1"]
    service.stopService()


def test_a_dropped_link_resends_only_the_unacknowledged_part(harness: Any) -> None:
    service, client, clock, store = harness
    completed(store, "M-1")
    service.startService()
    clock.advance(0)
    (_, d1), (second, d2) = client.sent
    client.sent = []
    d1.callback("ok-1")
    d2.errback(SubmitOutcomeUnknown("link dropped"))
    clock.advance(0)
    clock.advance(service.interval)  # the next pump claims it again
    assert [part.short_message for part, _ in client.sent] == [second.short_message]
    client.answer_all("again")
    clock.advance(0)
    assert table(store, messages)[0]["status"] == "submitted"
    assert sorted(p["seq"] for p in table(store, message_parts)) == [1, 2]
    service.stopService()


def test_a_refused_message_is_retried_later_not_at_once(harness: Any) -> None:
    service, client, clock, store = harness
    completed(store, "M-1")
    service.startService()
    clock.advance(0)
    for _, d in client.sent:
        d.errback(SubmitRejected(0x08))  # ESME_RSYSERR: the SMSC's trouble, worth another try
    client.sent = []
    clock.advance(0)
    [message] = table(store, messages)
    assert message["status"] == "queued" and message["attempts"] == 1
    clock.advance(60)
    assert client.sent == []  # retry_delay (10 min) not reached
    service.stopService()


def test_a_message_refused_for_good_is_failed_at_once(harness: Any) -> None:
    """R3.7: an invalid number (ESME_RINVDSTADR) will not do better in 10 minutes."""
    service, client, clock, store = harness
    completed(store, "M-1")
    service.startService()
    clock.advance(0)
    for _, d in client.sent:
        d.errback(SubmitRejected(0x0B))
    clock.advance(0)
    [message] = table(store, messages)
    assert (message["status"], message["attempts"], message["error"]) == ("failed", 1, "ESME_RINVDSTADR")
    service.stopService()


def test_a_slow_smsc_gets_a_bounded_number_of_copies_spaced_out(harness: Any) -> None:
    """A submit with no answer in time may have been taken: sent again after a growing pause,
    and after ``max_attempts`` time-outs failed and reported, not sent every response timeout."""
    service, client, clock, store = harness
    completed(store, "M-1")
    service.startService()
    clock.advance(0)
    sends = 0  # times the message went out (each time, all its parts unanswered)
    for _ in range(10):
        sends += bool(client.sent)
        for _, d in client.sent:
            d.errback(SubmitTimedOut("no submit_sm_resp within the response timeout"))
        client.sent = []
        clock.advance(1)
        if sends == 1:
            clock.advance(3)
            assert client.sent == []  # the pause (5 s) is not over
        clock.advance(10)
    [message] = table(store, messages)
    assert sends == 3 and message["status"] == "failed" and "3 times" in message["error"]
    service.stopService()


def receipt(smsc_id: str, state: int) -> DeliverSm:
    text = f"id:{smsc_id} sub:001 dlvrd:001 submit date:2611241000 done date:2611241000 stat:DELIVRD err:000"
    return DeliverSm("13800138000", "10690012345", 0x04, 0, text.encode(), smsc_id, state)


def test_receipts_and_a_reply_are_stored_before_they_are_acknowledged(harness: Any) -> None:
    service, client, clock, store = harness
    completed(store, "M-1")
    service.startService()
    clock.advance(0)
    client.answer_all()
    clock.advance(0)
    receipts = [service.on_deliver(receipt(smsc_id, 2)) for smsc_id in ("id0", "ID1")]
    assert not any(d.called for d in receipts)  # not acknowledged before it is kept (R3.7a)
    clock.advance(0)  # one group commit for both
    assert [d.result for d in receipts] == ["matched", "matched"]
    assert table(store, messages)[0]["status"] == "delivered"
    reply = DeliverSm("8613800138000", "10690012345", 0, 8, "1 谢谢".encode("utf-16-be"))  # key 1 = 非常满意
    done = service.on_deliver(reply)
    assert done.called and done.result.status == "rated"
    [rating] = table(store, ratings)
    assert rating["level"] == 5 and rating["channel"] == "sms"
    clock.advance(0)
    [(answer, _)] = client.sent  # the thanks goes out at once (SPEC R3.7a)
    assert "已收到" in answer.short_message.decode("utf-16-be")
    service.stopService()


def test_a_store_failure_fails_the_delivery_so_the_smsc_sends_it_again(
    harness: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = harness[0]

    def database_down(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("database is down")

    monkeypatch.setattr(service.sms_store, "store_reply", database_down)
    outcome = service.on_deliver(DeliverSm("8613800138000", "10690012345", 0, 8, "5".encode("utf-16-be")))
    failures: list[Any] = []
    outcome.addErrback(failures.append)
    assert failures  # the client answers ESME_RX_T_APPN (SPEC R3.7a)


def test_a_record_committed_late_is_found_by_the_periodic_look_back(harness: Any) -> None:
    from sqlalchemy import update

    from gateway.sms.service import MARGIN_EVERY
    from storage.schema import invitations, service_records

    service, _, clock, store = harness
    completed(store, "M-1")
    service.startService()
    clock.advance(0)
    completed(store, "M-late")
    with store.engine.begin() as connection:  # as if its transaction had committed late
        connection.execute(
            update(service_records)
            .where(service_records.c.external_id == "M-late")
            .values(updated_at=service._watermark.at - timedelta(minutes=5))
        )
    clock.advance(1)
    assert len(table(store, invitations)) == 1
    for _ in range(MARGIN_EVERY):
        clock.advance(1)
    assert len(table(store, invitations)) == 2
    service.stopService()


def test_a_part_the_client_cannot_encode_fails_the_attempt_instead_of_looping(harness: Any) -> None:
    service, client, clock, store = harness
    completed(store, "M-1")
    service.startService()
    clock.advance(0)
    for _, d in client.sent:
        d.errback(ValueError("source_addr is longer than 20 characters"))
    client.sent = []
    clock.advance(0)
    [message] = table(store, messages)
    assert message["status"] == "queued" and message["attempts"] == 1 and message["error"] == "unencodable"
    service.stopService()


def test_parts_waiting_longer_than_the_lease_are_sent_once_and_the_lease_is_kept(harness: Any) -> None:
    """SPEC R3.1: with the link down for longer than the lease, nothing is claimed and sent twice,
    by this sender or by another instance."""
    service, client, clock, store = harness
    completed(store, "M-1")
    service.startService()
    clock.advance(0)
    assert len(client.sent) == 2  # both parts handed to the client, which holds them (link down)
    for _ in range(int(service.lease * 2.5 / service.interval)):
        clock.advance(service.interval)
    assert len(client.sent) == 2
    [message] = table(store, messages)
    assert message["claimed_by"] == service.owner
    now = datetime.fromtimestamp(clock.seconds(), UTC)
    assert message["claimed_until"] > now  # renewed while the parts waited
    assert service.sms_store.claim_messages("other-instance", 10, lease=60, now=now) == []
    client.answer_all()
    clock.advance(0)
    assert table(store, messages)[0]["status"] == "submitted"
    service.stopService()


def test_bulk_parts_waiting_in_the_client_go_back_to_the_store_when_the_quiet_hours_begin(harness: Any) -> None:
    """SPEC R3.2 at the moment of sending: an invitation claimed at 20:59 whose parts still wait
    for the SMSC (a link down, a throttled one) at 21:00 is sent in the morning, not at 21:40;
    an answer to a citizen's own message still goes."""
    service, client, clock, store = harness
    clock.advance(datetime(2026, 11, 24, 12, 59, tzinfo=UTC).timestamp() - clock.seconds())  # 20:59 Shanghai
    completed(store, "M-1", at=datetime(2026, 11, 24, 12, 58, tzinfo=UTC))
    service.startService()
    clock.advance(0)
    assert len(client.sent) == 2  # claimed and handed to the client, not answered yet
    clock.advance(61)  # 21:00:01: the next scheduler round
    assert client.sent == []
    clock.advance(0)
    [message] = table(store, messages)
    assert (message["status"], message["claimed_by"], message["attempts"]) == ("queued", None, 0)
    clock.advance(600)
    assert client.sent == []  # the claims leave it alone until 08:00
    service.stopService()


def test_an_unreadable_receipt_is_kept_for_review_before_it_is_acknowledged(harness: Any) -> None:
    """R3.7: a receipt without a message id or a state is never guessed at, and never thrown away."""
    service, _client, clock, store = harness
    service.startService()
    pdu = DeliverSm("13800138000", "10690012345", 0x04, 0, b"sub:001 dlvrd:001 err:000", None, None)
    acknowledged = service.on_deliver(pdu)
    clock.advance(0)
    assert acknowledged.called
    [kept] = table(store, sms_inbox)
    assert (kept["kind"], kept["status"], kept["body"]) == ("receipt", "unreadable", "sub:001 dlvrd:001 err:000")
    service.stopService()


def test_a_look_back_with_more_to_read_than_a_round_goes_on_in_the_next_rounds(
    harness: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records that stay in the scan (batch items not completed yet) must not hide a record committed
    late behind them: the look-back carries on from where a round stopped."""
    from sqlalchemy import update

    from gateway.sms.service import MARGIN_EVERY
    from storage.schema import invitations, service_records

    scan = SmsStore.create_invitations

    def small_rounds(self: SmsStore, since: Any, **kw: Any) -> Any:
        return scan(self, since, **kw, limit=3, pages=1)

    monkeypatch.setattr(SmsStore, "create_invitations", small_rounds)
    service, _, clock, store = harness
    completed(store, "M-1")
    service.startService()
    clock.advance(0)
    store.upsert_service_records(
        [ServiceRecordInput(id=f"A-{k}", kind=ServiceKind.MATTER, batch_id=f"B-{k}") for k in range(10)]  # type: ignore[arg-type]
    )
    completed(store, "M-late")
    watermark = service._watermark.at
    with store.engine.begin() as connection:
        pending = service_records.c.external_id.like("A-%")
        connection.execute(update(service_records).where(pending).values(updated_at=watermark - timedelta(minutes=8)))
        late = service_records.c.external_id == "M-late"
        connection.execute(update(service_records).where(late).values(updated_at=watermark - timedelta(minutes=5)))
    for _ in range(MARGIN_EVERY + 5):
        clock.advance(1)
    assert len(table(store, invitations)) == 2
    service.stopService()
