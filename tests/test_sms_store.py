"""The SMS channel's store side (storage/sms.py) on SQLite and a real PostgreSQL server.

Time is passed in (``now=``), so the schedule is walked through holidays without waiting.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, insert, select, update

from gateway.intake import ServiceRecordInput
from gateway.platform.records import evaluation_record
from gateway.rating import Channel, Level, ServiceKind
from gateway.sms.receipts import DeliveryState
from gateway.sms.settings import SmsSettings
from gateway.sms.text import encode_ucs2_parts
from gateway.workdays import SHANGHAI, WorkingDayCalendar
from storage.outbox import Outbox
from storage.schema import invitations, message_parts, messages, opt_outs, outbox, ratings, service_records
from storage.sms import Ack, ScanPosition, SmsStore, concat_reference
from storage.store import Store

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
PHONE = "+8613800138000"
OTHER_PHONE = "+8613900139000"


def shanghai(*args: int) -> datetime:
    return datetime(*args, tzinfo=SHANGHAI)  # type: ignore[misc]


#: "Now" for the calls that do not pass one: 10:00 in Shanghai, so that the suite reads the same
#: at any hour (quiet hours, R3.2, hold invitations from 21:00 to 08:00).
DAYTIME = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def daytime(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("storage.sms.utcnow", lambda: DAYTIME)


@pytest.fixture
def sms(store: Store) -> SmsStore:
    return SmsStore(store, SmsSettings(), WorkingDayCalendar())


def complete(store: Store, record_id: str, at: datetime, phone: str | None = PHONE, **fields: object) -> int:
    store.upsert_service_records(
        [
            ServiceRecordInput(  # type: ignore[arg-type]
                id=record_id, kind=ServiceKind.MATTER, completed_at=at, mobile=phone, matter_name="营业执照", **fields
            )
        ]
    )
    with store.engine.connect() as connection:
        return int(
            connection.execute(select(service_records.c.id).where(service_records.c.external_id == record_id)).scalar()
        )


def rows(store: Store, table, *where):  # type: ignore[no-untyped-def]
    with store.engine.connect() as connection:
        order = list(table.primary_key.columns)
        return connection.execute(select(table).where(*where).order_by(*order)).mappings().all()


def invite(sms: SmsStore, at: datetime) -> None:
    sms.create_invitations(EPOCH, now=at)
    sms.run_due_steps(now=at)


def test_invitation_within_a_minute_then_one_reminder_then_the_default(store: Store, sms: SmsStore) -> None:
    done = shanghai(2026, 11, 23, 10, 0)  # a Monday
    record = complete(store, "M-1", done)
    sms.create_invitations(EPOCH, now=done)
    sms.create_invitations(EPOCH, now=done)  # twice: still one invitation (R3.1)
    [inv] = rows(store, invitations)
    assert inv["extension_code"] == f"{record % 10000:04d}"
    assert inv["send_after"] == done + timedelta(seconds=60)
    assert inv["closes_at"] == shanghai(2026, 11, 30, 10, 0)  # 5 working days (R3.4)

    assert sms.run_due_steps(now=done + timedelta(seconds=30)).invitations == 0
    assert sms.run_due_steps(now=done + timedelta(seconds=61)).invitations == 1
    [message] = rows(store, messages)
    assert message["kind"] == "invitation" and message["status"] == "queued"
    assert message["body"].startswith("【12345热线】") and "营业执照" in message["body"]
    assert message["source_addr"] == "10690012345" + inv["extension_code"]
    assert sms.run_due_steps(now=done + timedelta(hours=2)).invitations == 0

    counts = sms.run_due_steps(now=done + timedelta(hours=24, seconds=61))
    assert counts.reminders == 1  # R3.3: exactly one
    for hours in (30, 48, 72):
        assert sms.run_due_steps(now=done + timedelta(hours=hours)).reminders == 0
    assert [m["kind"] for m in rows(store, messages)] == ["invitation", "reminder"]

    assert sms.run_due_steps(now=shanghai(2026, 11, 30, 9, 59)).defaults == 0
    assert sms.run_due_steps(now=shanghai(2026, 11, 30, 10, 0)).defaults == 1
    [rating] = rows(store, ratings)
    assert (
        rating["level"] == int(Level.BASICALLY_SATISFIED)
        and rating["is_default"]
        and rating["channel"] == Channel.SYSTEM
    )
    assert len(rows(store, outbox)) == 1  # pushed like any rating (R3.4, R7.1)
    assert rows(store, invitations)[0]["status"] == "closed"
    assert sms.run_due_steps(now=shanghai(2026, 12, 30, 10, 0)) == type(sms.run_due_steps())()
    # A late reply is told the window closed (R3.6), not that the citizen "already rated".
    late = sms.store_reply("13800138000", "10690012345", "2".encode("utf-16-be"), 8, now=shanghai(2026, 12, 1, 9, 0))
    assert late.status == "closed"


def test_a_window_in_a_year_the_calendar_does_not_know_waits_and_stops_nothing_else(
    store: Store, sms: SmsStore, tmp_path: Path
) -> None:
    """SPEC R3.4 never guessed, R3.1 never stopped: a service completed on 2026-12-28 has its
    5-working-day window in 2027, which chinese-calendar 1.11 does not know."""
    late, known = shanghai(2026, 12, 28, 10, 0), shanghai(2026, 12, 24, 10, 0)
    unknown_year = complete(store, "M-2027", late, phone=OTHER_PHONE)
    complete(store, "M-KNOWN", known)  # its window ends on 2026-12-31
    sms.create_invitations(EPOCH, now=late)  # no error: both invitations exist
    closes = {row["service_record_id"]: row["closes_at"] for row in rows(store, invitations)}
    assert closes[unknown_year] is None and len(closes) == 2
    steps = sms.run_due_steps(now=late + timedelta(minutes=2))
    assert (steps.invitations, steps.deferred) == (1, 1)  # the known one is sent, the other waits
    override = tmp_path / "calendar.toml"
    override.write_text('[2027]\nholidays = ["2027-01-01"]\nworkdays = []\n', encoding="utf-8")
    knowing = SmsStore(store, SmsSettings(), WorkingDayCalendar.from_override_file(str(override)))
    assert knowing.run_due_steps(now=late + timedelta(hours=2)).invitations == 1
    [waited] = rows(store, invitations, invitations.c.service_record_id == unknown_year)
    assert waited["status"] == "sent"
    assert waited["closes_at"] == shanghai(2027, 1, 5, 10, 0)  # 12-29, 12-30, 12-31, 01-04, 01-05


def test_quiet_hours_hold_the_invitation_until_morning(store: Store, sms: SmsStore) -> None:
    done = shanghai(2026, 11, 23, 21, 30)
    complete(store, "M-night", done)
    sms.create_invitations(EPOCH, now=done)
    assert sms.run_due_steps(now=done + timedelta(minutes=2)).deferred == 1  # R3.2
    assert rows(store, invitations)[0]["next_step_at"] == shanghai(2026, 11, 24, 8, 0)
    assert sms.run_due_steps(now=shanghai(2026, 11, 24, 7, 59)).invitations == 0
    assert sms.run_due_steps(now=shanghai(2026, 11, 24, 8, 0)).invitations == 1


def test_spring_festival_moves_the_window_past_the_holiday(store: Store, sms: SmsStore) -> None:
    done = shanghai(2026, 2, 13, 16, 0)  # Friday before the 2026 Spring Festival break
    complete(store, "M-cny", done)
    sms.create_invitations(EPOCH, now=done)
    closes = rows(store, invitations)[0]["closes_at"].astimezone(SHANGHAI)
    # 2026-02-14 (Saturday) is a make-up working day, then 15-23 February are off.
    assert closes == shanghai(2026, 2, 27, 16, 0)


def test_only_unrated_completed_records_are_invited(store: Store, sms: SmsStore) -> None:
    done = shanghai(2026, 11, 23, 10, 0)
    no_phone = complete(store, "M-no-phone", done, phone=None)  # gets the default only, below
    store.upsert_service_records([ServiceRecordInput(id="M-open", kind=ServiceKind.MATTER, mobile=PHONE)])
    rated = complete(store, "M-rated", done)
    with store.engine.begin() as connection:
        store.add_rating(
            connection,
            service_record_id=rated,
            level=Level.SATISFIED,
            channel=Channel.WEB,
            raw_input="4",
            rated_at=done,
        )
    call = "1700000000.42"
    store.record_unrated_call({"call_id": call, "caller": "13800138000"}, reason="timeout")  # R2.3
    sms.create_invitations(EPOCH, now=done)
    invited = {row["service_record_id"] for row in rows(store, invitations)}
    with store.engine.connect() as connection:
        call_record = connection.execute(select(service_records.c.id).where(service_records.c.call_id == call)).scalar()
    assert invited == {call_record, no_phone}


@pytest.mark.parametrize("phone", ["+861012345678", None], ids=["land line", "no number"])
def test_a_record_that_cannot_get_an_sms_gets_the_default_rating(
    store: Store, sms: SmsStore, phone: str | None
) -> None:
    """SPEC R3.4 holds for every completed service, whatever it can be asked by."""
    done = shanghai(2026, 11, 23, 10, 0)
    complete(store, "M-land", done, phone=phone)
    invite(sms, done + timedelta(minutes=2))
    assert sms.run_due_steps(now=done + timedelta(days=2)).reminders == 0
    assert rows(store, messages) == []
    assert sms.run_due_steps(now=shanghai(2026, 11, 30, 10, 0)).defaults == 1
    [rating] = rows(store, ratings)
    assert rating["is_default"] and rating["level"] == int(Level.BASICALLY_SATISFIED)


def test_claim_ack_and_receipts_per_part(store: Store, sms: SmsStore) -> None:
    done = shanghai(2026, 11, 23, 10, 0)
    complete(store, "M-1", done)
    invite(sms, done + timedelta(minutes=2))
    [out] = sms.claim_messages("a", 10, lease=60)
    assert out.destination == "13800138000"
    assert sms.claim_messages("b", 10, lease=60) == []  # leased to a
    parts = encode_ucs2_parts(out.body, out.concat_ref)
    assert len(parts) >= 2  # the invitation is a long message (R3.1)
    # Receipt for part 1 arrives before its mapping is stored: kept, applied later (R3.7).
    assert sms.store_receipt("00000A1F", DeliveryState.DELIVERED, "000") == "unmatched"
    acks = [
        Ack(out.id, out.attempt, seq, len(parts), smsc_id, seq == len(parts))
        for seq, smsc_id in zip(range(1, len(parts) + 1), ["a1f", "a20", "a21", "a22"], strict=False)
    ]
    assert sms.record_acks(acks) == 1
    assert rows(store, messages)[0]["status"] == "submitted"
    # The remaining receipts in decimal for hex ids, and a repeat.
    for smsc_id in ["2592", "2593", "2594"][: len(parts) - 1]:
        assert sms.store_receipt(smsc_id, DeliveryState.DELIVERED, "000") == "matched"
    assert sms.store_receipt("2592", DeliveryState.DELIVERED, "000") == "repeat"
    assert {p["status"] for p in rows(store, message_parts)} == {"delivered"}
    assert rows(store, messages)[0]["status"] == "delivered"


def test_a_resumed_send_skips_acknowledged_parts_and_keeps_the_reference(store: Store, sms: SmsStore) -> None:
    done = shanghai(2026, 11, 23, 10, 0)
    complete(store, "M-1", done)
    invite(sms, done + timedelta(minutes=2))
    [out] = sms.claim_messages("a", 10, lease=60)
    total = len(encode_ucs2_parts(out.body, out.concat_ref))
    sms.record_acks([Ack(out.id, out.attempt, 1, total, "m-1", False)])
    sms.release_messages([out.id])  # the link dropped with part 2 unanswered
    [again] = sms.claim_messages("b", 10, lease=60)
    assert again.acknowledged == frozenset({1})
    assert again.concat_ref == out.concat_ref == concat_reference(out.id, 0)


def test_failures_are_retried_then_reported(store: Store, sms: SmsStore) -> None:
    done = shanghai(2026, 11, 23, 10, 0)
    complete(store, "M-1", done)
    invite(sms, done + timedelta(minutes=2))
    now = DAYTIME
    refs = set()
    for attempt in range(3):
        [out] = sms.claim_messages("a", 10, lease=60, now=now)
        assert out.attempt == attempt
        refs.add(out.concat_ref)
        sms.fail_attempts({out.id: "ESME_RINVDSTADR"}, now=now)
        now += timedelta(minutes=11)
    [message] = rows(store, messages)
    assert message["status"] == "failed" and message["attempts"] == 3 and message["error"] == "ESME_RINVDSTADR"
    assert len(refs) == 3  # each attempt under its own UDH reference
    assert sms.claim_messages("a", 10, lease=60, now=now) == []


def test_undelivered_receipt_retries_the_message(store: Store, sms: SmsStore) -> None:
    done = shanghai(2026, 11, 23, 10, 0)
    complete(store, "M-1", done)
    invite(sms, done + timedelta(minutes=2))
    [out] = sms.claim_messages("a", 10, lease=60)
    total = len(encode_ucs2_parts(out.body, out.concat_ref))
    sms.record_acks([Ack(out.id, 0, seq, total, f"x{seq}", seq == total) for seq in range(1, total + 1)])
    assert sms.store_receipt("X2", DeliveryState.UNDELIVERABLE, "011") == "matched"
    [message] = rows(store, messages)
    assert message["status"] == "queued" and message["attempts"] == 1


def test_a_message_held_in_flight_is_not_claimed_again_when_its_lease_runs_out(store: Store, sms: SmsStore) -> None:
    """SPEC R3.1: a link down for longer than the lease must not make the holder send it twice."""
    done = shanghai(2026, 11, 23, 10, 0)
    complete(store, "M-1", done)
    invite(sms, done + timedelta(minutes=2))
    now = DAYTIME
    [out] = sms.claim_messages("a", 10, lease=60, now=now)
    assert sms.claim_messages("a", 10, lease=60, holding=[out.id], now=now + timedelta(seconds=61)) == []
    # The holder renews its lease while parts wait; no other sender takes the message meanwhile.
    assert sms.renew_leases("a", [out.id], lease=60, now=now + timedelta(seconds=40)) == 1
    assert sms.claim_messages("b", 10, lease=60, now=now + timedelta(seconds=61)) == []
    assert sms.renew_leases("b", [out.id], lease=60, now=now + timedelta(seconds=61)) == 0  # not b's to renew
    # Not renewed (the holder died): after the lease another sender takes it over.
    [again] = sms.claim_messages("b", 10, lease=60, now=now + timedelta(seconds=101))
    assert again.id == out.id
    # The first holder's late release does not free b's lease.
    sms.release_messages([out.id], owner="a")
    assert rows(store, messages)[0]["claimed_by"] == "b"
    sms.release_messages([out.id], owner="b")
    assert rows(store, messages)[0]["claimed_by"] is None


def test_invitations_queued_before_21h_wait_for_the_morning_but_answers_go(store: Store, sms: SmsStore) -> None:
    """SPEC R3.2 when sending, not only when queueing: a backlog or a retry after 21:00 waits."""
    done = shanghai(2026, 11, 23, 20, 58)
    complete(store, "M-1", done)
    invite(sms, done + timedelta(minutes=1, seconds=30))  # queued at 20:59:30
    assert sms.claim_messages("a", 10, lease=60, now=shanghai(2026, 11, 23, 21, 0, 5)) == []
    invitation_id = rows(store, messages)[0]["id"]
    at_night = shanghai(2026, 11, 23, 21, 0, 5)
    rated = sms.store_reply("13800138000", "10690012345", "2".encode("utf-16-be"), 8, now=at_night)
    assert rated.status == "rated"  # the citizen's own message gets its answer at once (R3.7a)
    claimed = sms.claim_messages("a", 10, lease=60, now=shanghai(2026, 11, 23, 21, 0, 10))
    [answer] = claimed
    assert answer.id != invitation_id
    morning = sms.claim_messages("b", 10, lease=60, now=shanghai(2026, 11, 24, 8, 0))
    assert invitation_id in {m.id for m in morning}


def test_a_late_answer_to_an_attempt_a_receipt_failed_completes_nothing(store: Store, sms: SmsStore) -> None:
    """SPEC R3.7: part 1's failure receipt comes while part 2 waits for its submit_sm_resp."""
    done = shanghai(2026, 11, 23, 10, 0)
    complete(store, "M-1", done)
    invite(sms, done + timedelta(minutes=2))
    [out] = sms.claim_messages("a", 10, lease=60)
    total = len(encode_ucs2_parts(out.body, out.concat_ref))
    assert total >= 2
    sms.record_acks([Ack(out.id, 0, 1, total, "x1", False)])
    assert sms.store_receipt("x1", DeliveryState.UNDELIVERABLE, "011") == "matched"
    assert (rows(store, messages)[0]["status"], rows(store, messages)[0]["attempts"]) == ("queued", 1)
    # Attempt 0's last answers come late: the message is not "submitted", attempt 1 is still due.
    assert sms.record_acks([Ack(out.id, 0, seq, total, f"x{seq}", seq == total) for seq in range(2, total + 1)]) == 0
    # And a refusal of a part of attempt 0 does not fail it a second time.
    sms.fail_attempts({out.id: "ESME_RTHROTTLED"}, attempts={out.id: 0})
    [message] = rows(store, messages)
    assert (message["status"], message["attempts"]) == ("queued", 1)
    [retry] = sms.claim_messages("a", 10, lease=60, now=DAYTIME + timedelta(hours=1))
    assert retry.attempt == 1 and retry.acknowledged == frozenset()


def test_parts_of_one_reply_stored_at_the_same_moment_are_put_together(
    store: Store, sms: SmsStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two threads (or instances) store the two parts at once: one of them finds the reply whole."""
    done = shanghai(2026, 11, 23, 10, 0)
    complete(store, "M-1", done)
    invite(sms, done + timedelta(minutes=2))
    raw = "4 窗口态度不好".encode("utf-16-be")
    first_inside = threading.Event()
    real = SmsStore._whole_message

    def slow_first(self, connection, phone_hash, concatenation, now):  # type: ignore[no-untyped-def]
        whole = real(self, connection, phone_hash, concatenation, now)
        if concatenation[2] == 1:
            first_inside.set()
            time.sleep(0.5)  # part 1 found itself alone; part 2 comes before its transaction ends
        return whole

    monkeypatch.setattr(SmsStore, "_whole_message", slow_first)
    outcomes: dict[int, str] = {}

    def store_part(seq: int, payload: bytes) -> None:
        at = done + timedelta(hours=1)
        outcomes[seq] = sms.store_reply(
            "13800138000", "10690012345", payload, 8, concatenation=(9, 2, seq), now=at
        ).status

    first = threading.Thread(target=store_part, args=(1, raw[:6]))
    first.start()
    assert first_inside.wait(10)
    second = threading.Thread(target=store_part, args=(2, raw[6:]))
    second.start()
    first.join(30)
    second.join(30)
    assert sorted(outcomes.values()) == ["rated", "waiting"]
    [rating] = rows(store, ratings)
    assert rating["level"] == int(Level.DISSATISFIED) and rating["comment"] == "窗口态度不好"


def reply(sms: SmsStore, text: str, phone: str = "13800138000", to: str = "10690012345") -> str:
    return sms.store_reply(phone, to, text.encode("utf-16-be"), 8).status


def test_reply_digit_with_comment_becomes_an_sms_rating_and_is_thanked_first(store: Store, sms: SmsStore) -> None:
    done = shanghai(2026, 11, 23, 10, 0)
    complete(store, "M-1", done)
    invite(sms, done + timedelta(minutes=2))
    assert reply(sms, "４ 窗口态度不好") == "rated"
    [rating] = rows(store, ratings)
    assert rating["level"] == int(Level.DISSATISFIED) and rating["channel"] == "sms"
    assert rating["comment"] == "窗口态度不好"
    claimed = sms.claim_messages("a", 1, lease=60)
    assert "已收到" in claimed[0].body  # the answer goes ahead of the queued invitation (R3.7a)
    assert reply(sms, "5") == "already_rated"
    assert len(rows(store, ratings)) == 1
    assert rows(store, invitations)[0]["status"] == "rated"
    assert sms.run_due_steps(now=done + timedelta(days=2)).reminders == 0  # no reminder once rated


def test_answers_to_a_number_that_keeps_replying_are_deferred_by_the_caps_not_dropped(
    store: Store, sms: SmsStore
) -> None:
    """SPEC R3.10: an auto-responder answering every message must not make the gateway exceed the
    carrier's caps (3 a minute, 10 an hour)."""
    done = shanghai(2026, 11, 23, 10, 0)
    complete(store, "M-1", done)
    invite(sms, done + timedelta(minutes=2))
    start = done + timedelta(minutes=5)
    texts = ["2", "2 好", "2 谢谢", "2 很好", "2 棒", "2 赞"]  # different texts: none is a repeat (R3.7a)
    outcomes = [
        sms.store_reply("13800138000", "10690012345", text.encode("utf-16-be"), 8, now=start + timedelta(seconds=n))
        for n, text in enumerate(texts)
    ]
    assert [o.status for o in outcomes] == ["rated"] + ["already_rated"] * 5
    answers = rows(store, messages, messages.c.kind == "answer")
    assert len(answers) == sum(o.answered for o in outcomes)  # deferred, none dropped
    due_at_once = [a for a in answers if a["send_after"] < start + timedelta(minutes=1)]
    assert len(due_at_once) == 3  # at most 3 a minute
    # Not the same-content cap: the same answer twice is not held a day (two thanks are two answers).
    assert max(a["send_after"] for a in answers) < start + timedelta(hours=1)


def test_a_record_whose_number_comes_in_a_later_update_is_still_invited(store: Store, sms: SmsStore) -> None:
    """R3.1 and R3.4: invited (for its default) without a number, it gets its SMS once the number comes."""
    done = shanghai(2026, 11, 23, 10, 0)
    record = complete(store, "M-1", done, phone=None)
    invite(sms, done + timedelta(minutes=2))
    assert rows(store, messages) == []
    complete(store, "M-1", done, phone=PHONE)  # the intake fills the number in
    steps = sms.run_due_steps(now=done + timedelta(hours=1, minutes=3))
    assert steps.invitations == 1
    [message] = rows(store, messages)
    assert message["kind"] == "invitation" and rows(store, invitations)[0]["service_record_id"] == record


def test_a_batch_is_invited_once_and_its_rating_covers_every_item(store: Store, sms: SmsStore) -> None:
    """SPEC R1.6: one rating applies to every item of a batch, so the citizen is asked once (not
    once per item, which the same-content cap would have spread over the next days as repeats),
    and neither a reminder nor a default stands in for the other items afterwards."""
    done = shanghai(2026, 11, 23, 10, 0)
    first, *_ = [complete(store, f"B-{n}", done, batch_id="BATCH-1") for n in range(3)]
    invite(sms, done + timedelta(minutes=2))
    [invitation] = rows(store, invitations)
    assert invitation["service_record_id"] == first
    [message] = rows(store, messages)
    assert "“营业执照”事项（批量3件）已办结" in message["body"]
    assert reply(sms, "4") == "rated"
    steps = sms.run_due_steps(now=done + timedelta(hours=25))
    assert steps.reminders == 0
    assert sms.run_due_steps(now=shanghai(2026, 12, 1, 10, 0)).defaults == 0
    assert [(r["service_record_id"], r["is_default"]) for r in rows(store, ratings)] == [(first, False)]
    late_item = complete(store, "B-3", done + timedelta(hours=2), batch_id="BATCH-1")
    sms.create_invitations(EPOCH, now=done + timedelta(hours=3))
    assert late_item not in {row["service_record_id"] for row in rows(store, invitations)}


def test_a_batch_rated_before_its_invitation_is_not_invited(store: Store, sms: SmsStore) -> None:
    """SPEC R1.6: a rating of any item (at the window, on the web) already rates the batch."""
    done = shanghai(2026, 11, 23, 10, 0)
    items = [complete(store, f"B-{n}", done, batch_id="BATCH-1") for n in range(3)]
    web_rating(store, items[2], done)
    invite(sms, done + timedelta(minutes=2))
    assert rows(store, invitations) == [] and rows(store, messages) == []


def test_an_unanswered_batch_gets_one_default_rating_for_all_its_items(store: Store, sms: SmsStore) -> None:
    """R3.4 with R1.6: the default is the batch's one rating; the push says which items it covers."""
    done = shanghai(2026, 11, 23, 10, 0)
    first, *_ = [complete(store, f"B-{n}", done, batch_id="BATCH-1") for n in range(3)]
    invite(sms, done + timedelta(minutes=2))
    sms.run_due_steps(now=done + timedelta(hours=25))
    assert sms.run_due_steps(now=shanghai(2026, 12, 1, 10, 0)).defaults == 1
    assert [(r["service_record_id"], r["is_default"]) for r in rows(store, ratings)] == [(first, True)]
    assert pushed_covering(store) == [["B-0", "B-1", "B-2"]]


def pushed_covering(store: Store) -> list[list[str] | None]:
    """The ``appliesTo`` of each rating the pusher would send now (PLATFORM.md, SPEC R1.6)."""
    claimed = Outbox(store).claim("test", 100, lease=60)
    return [evaluation_record(item.facts).get("appliesTo") for item in claimed]  # type: ignore[arg-type]


def test_a_theme_is_asked_once_for_its_overall_rating(store: Store, sms: SmsStore) -> None:
    """SPEC R1.6: a theme's (主题式"一件事") overall rating applies to all its matters; the reply is
    kept as that overall rating, on one of them, and pushed as covering every one."""
    done = shanghai(2026, 11, 23, 10, 0)
    matters = [complete(store, f"T-{n}", done, theme_id="THEME-1", matter_code=f"X{n}") for n in range(3)]
    complete(store, "T-3", done, theme_id="THEME-1", matter_code="X2")  # a batch of X2 within the theme
    invite(sms, done + timedelta(minutes=2))
    [invitation] = rows(store, invitations)
    assert invitation["service_record_id"] == matters[0]
    [message] = rows(store, messages)
    assert "您办理的“一件事”主题服务（含“营业执照”等3个事项）已办结，请您对整体服务评价" in message["body"]
    assert reply(sms, "1") == "rated"
    [rating] = rows(store, ratings)
    assert (rating["service_record_id"], rating["overall"], rating["level"]) == (matters[0], True, 5)
    assert pushed_covering(store) == [["T-0", "T-1", "T-2", "T-3"]]
    assert sms.run_due_steps(now=done + timedelta(hours=25)).reminders == 0
    assert reply(sms, "2") == "already_rated"


def test_a_theme_matter_rated_on_its_own_leaves_the_overall_question_open(store: Store, sms: SmsStore) -> None:
    """R1.6: the citizen may rate a matter separately; that rating takes precedence for that
    matter only, and the theme's overall rating still covers the others, even when kept on the
    same matter (its own slot: migration 0006). Either order."""
    done = shanghai(2026, 11, 23, 10, 0)
    matters = [complete(store, f"T-{n}", done, theme_id="THEME-1") for n in range(3)]
    invite(sms, done + timedelta(minutes=2))
    web_rating(store, matters[0], done + timedelta(minutes=5))
    assert reply(sms, "1") == "rated"
    kept = sorted((r["service_record_id"], r["overall"], r["is_attempt"]) for r in rows(store, ratings))
    assert kept == [(matters[0], False, False), (matters[0], True, False)]
    assert sorted(pushed_covering(store), key=str) == [None, ["T-0", "T-1", "T-2"]]  # its own covers itself alone
    web_rating(store, matters[1], done + timedelta(minutes=9))  # after the overall rating: counted too
    assert not rows(store, ratings, ratings.c.service_record_id == matters[1])[0]["is_attempt"]


def web_rating(store: Store, record: int, at: datetime, level: Level = Level.DISSATISFIED) -> bool:
    """A rating of one record by another channel (the web); whether it counted (R1.4)."""
    with store.engine.begin() as connection:
        return store.add_rating(
            connection, service_record_id=record, level=level, channel=Channel.WEB, raw_input="2", rated_at=at
        )[2]


def test_a_group_is_invited_on_an_item_whose_number_can_get_the_sms(store: Store, sms: SmsStore) -> None:
    """R1.6 with R3.1: the first item of a batch had no number, a land line or an opted-out one."""
    done = shanghai(2026, 11, 23, 10, 0)
    complete(store, "B-0", done, phone=None, batch_id="BATCH-1")
    complete(store, "B-1", done, phone="+861087654321", batch_id="BATCH-1")
    reachable = complete(store, "B-2", done, batch_id="BATCH-1")
    invite(sms, done + timedelta(minutes=2))
    assert [row["service_record_id"] for row in rows(store, invitations)] == [reachable]
    assert [m["kind"] for m in rows(store, messages)] == ["invitation"]


def test_a_theme_is_asked_once_all_its_matters_are_completed(store: Store, sms: SmsStore) -> None:
    """R1.6: "一件事" is done when its last matter is; the window runs from then (R3.4)."""
    done = shanghai(2026, 11, 23, 10, 0)
    complete(store, "T-0", done, theme_id="THEME-1")
    store.upsert_service_records(
        [ServiceRecordInput(id="T-1", kind=ServiceKind.MATTER, mobile=PHONE, theme_id="THEME-1")]  # type: ignore[arg-type]
    )
    invite(sms, done + timedelta(minutes=2))
    assert rows(store, invitations) == []
    last = done + timedelta(days=1)
    complete(store, "T-1", last, theme_id="THEME-1")
    invite(sms, last + timedelta(minutes=2))
    [invitation] = rows(store, invitations)
    assert invitation["send_after"] == last + sms.settings.schedule.invite_delay
    assert invitation["closes_at"] == sms.settings.schedule.closes_at(last, sms.calendar)


def test_one_invitation_per_item_from_before_is_superseded_by_the_first(store: Store, sms: SmsStore) -> None:
    """Stores written before R1.6 held one invitation per batch item: only the first one asks;
    the others, sent or not, get no reminder and no default, and a reply to one is still heard."""
    done = shanghai(2026, 11, 23, 10, 0)
    items = [complete(store, f"B-{n}", done, batch_id="BATCH-1") for n in range(3)]
    sent = done + timedelta(minutes=2)
    with store.engine.begin() as connection:
        for n, item in enumerate(items):
            connection.execute(
                insert(invitations).values(
                    service_record_id=item, channel="sms", extension_code=f"000{n + 1}", created_at=done,
                    status="sent" if n == 1 else "scheduled", send_after=done, sent_at=sent if n == 1 else None,
                    closes_at=shanghai(2026, 11, 30, 10, 0), next_step_at=sent,
                )
            )  # fmt: skip
    steps = sms.run_due_steps(now=sent)
    assert (steps.invitations, steps.done) == (1, 2)
    assert [r["status"] for r in rows(store, invitations)] == ["sent", "sent", "superseded"]
    sms.run_due_steps(now=done + timedelta(hours=25))
    assert sms.run_due_steps(now=shanghai(2026, 12, 1, 10, 0)).defaults == 1
    assert [(r["service_record_id"], r["is_default"]) for r in rows(store, ratings)] == [(items[0], True)]


def test_a_batch_rated_by_another_channel_after_the_sms_is_already_rated(store: Store, sms: SmsStore) -> None:
    """R1.6 with R1.4: one rating for the batch; a reply after a rating of another item is not a second one."""
    done = shanghai(2026, 11, 23, 10, 0)
    items = [complete(store, f"B-{n}", done, batch_id="BATCH-1") for n in range(2)]
    invite(sms, done + timedelta(minutes=2))
    web_rating(store, items[1], done + timedelta(minutes=5))
    assert reply(sms, "1") == "already_rated"
    assert [r["service_record_id"] for r in rows(store, ratings)] == [items[1]]


def test_a_theme_whose_matters_were_all_rated_on_their_own_is_not_asked(store: Store, sms: SmsStore) -> None:
    done = shanghai(2026, 11, 23, 10, 0)
    matters = [complete(store, f"T-{n}", done, theme_id="THEME-1") for n in range(2)]
    sms.create_invitations(EPOCH, now=done + timedelta(minutes=1))
    for pk in matters:
        web_rating(store, pk, done)
    assert sms.run_due_steps(now=done + timedelta(minutes=2)).done == 1
    assert rows(store, messages) == []
    assert sms.run_due_steps(now=shanghai(2026, 12, 1, 10, 0)).defaults == 0


def test_an_unanswered_theme_gets_one_overall_default(store: Store, sms: SmsStore) -> None:
    done = shanghai(2026, 11, 23, 10, 0)
    matters = [complete(store, f"T-{n}", done, theme_id="THEME-1") for n in range(3)]
    invite(sms, done + timedelta(minutes=2))
    sms.run_due_steps(now=done + timedelta(hours=25))
    assert sms.run_due_steps(now=shanghai(2026, 12, 1, 10, 0)).defaults == 1
    [rating] = rows(store, ratings)
    assert (rating["service_record_id"], rating["overall"], rating["is_default"]) == (matters[0], True, True)
    [record] = [evaluation_record(item.facts) for item in Outbox(store).claim("test", 10, lease=60)]  # type: ignore[arg-type]
    assert record["pf"] == "7" and record["appliesTo"] == ["T-0", "T-1", "T-2"]  # invited by SMS (PLATFORM.md)
    assert reply(sms, "1") == "closed"


def test_two_instances_do_not_invite_two_items_of_one_batch(
    store: Store, sms: SmsStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """R1.6 on a shared PostgreSQL: an instance that looks while another is inviting an item of
    the same batch waits for it, and then sees the batch invited."""
    done = shanghai(2026, 11, 23, 10, 0)
    complete(store, "B-0", done, batch_id="BATCH-1")
    time.sleep(0.01)
    complete(store, "B-1", done, batch_id="BATCH-1")
    [since] = [r["updated_at"] for r in rows(store, service_records, service_records.c.external_id == "B-1")]
    first, second = (SmsStore(store, SmsSettings(), WorkingDayCalendar()) for _ in range(2))
    inside = threading.Event()
    real = SmsSettings.extension_code

    def slow(self: SmsSettings, record_id: int) -> str:
        if threading.current_thread().name == "first":
            inside.set()
            time.sleep(0.5)  # the first instance has chosen B-1 and not committed yet
        return real(self, record_id)

    monkeypatch.setattr(SmsSettings, "extension_code", slow)
    later = done + timedelta(minutes=2)
    thread = threading.Thread(target=first.create_invitations, args=(since,), kwargs={"now": later}, name="first")
    thread.start()
    assert inside.wait(10)
    second.create_invitations(EPOCH, now=later)  # would choose B-0
    thread.join(30)
    assert len(rows(store, invitations)) == 1


def test_unclear_reply_gets_one_clarification(store: Store, sms: SmsStore) -> None:
    done = shanghai(2026, 11, 23, 10, 0)
    complete(store, "M-1", done)
    invite(sms, done + timedelta(minutes=2))
    assert reply(sms, "你好请问") == "unclear"
    assert reply(sms, "还是不明白") == "unclear"
    answers = [m for m in rows(store, messages) if m["kind"] == "answer"]
    assert len(answers) == 1 and "未能识别" in answers[0]["body"]
    assert rows(store, ratings) == []


def test_opt_out_is_confirmed_once_and_stops_the_reminder(store: Store, sms: SmsStore) -> None:
    done = shanghai(2026, 11, 23, 10, 0)
    complete(store, "M-1", done)
    invite(sms, done + timedelta(minutes=2))
    assert reply(sms, "ＴＤ") == "opt_out"
    assert reply(sms, "退订") == "opt_out"
    assert len(rows(store, opt_outs)) == 1
    assert len([m for m in rows(store, messages) if m["kind"] == "answer"]) == 1
    assert sms.run_due_steps(now=done + timedelta(days=1, minutes=5)).reminders == 0  # R3.8
    complete(store, "M-2", done + timedelta(days=1))
    invite(sms, done + timedelta(days=1, minutes=5))
    assert [m["kind"] for m in rows(store, messages) if m["direction"] == "out"] == ["invitation", "answer"]


def test_never_invited_or_closed_window_records_nothing(store: Store, sms: SmsStore) -> None:
    assert reply(sms, "5", phone=OTHER_PHONE) == "not_invited"
    done = shanghai(2026, 11, 23, 10, 0)
    complete(store, "M-1", done)
    invite(sms, done + timedelta(minutes=2))
    with store.engine.begin() as connection:
        connection.execute(update(invitations).values(closes_at=DAYTIME - timedelta(seconds=1)))
    assert reply(sms, "5") == "closed"
    assert rows(store, ratings) == []
    answers = [m for m in rows(store, messages) if m["kind"] == "answer"]
    assert len(answers) == 2 and all("评价期已结束" in m["body"] for m in answers)  # polite, both (R3.6)


def test_extension_code_picks_the_invitation_else_the_latest(store: Store, sms: SmsStore) -> None:
    done = shanghai(2026, 11, 23, 10, 0)
    first = complete(store, "M-1", done)
    second = complete(store, "M-2", done + timedelta(minutes=1))
    invite(sms, done + timedelta(minutes=5))
    code = SmsSettings().extension_code(first)
    assert reply(sms, "1", to="10690012345" + code) == "rated"
    assert rows(store, ratings)[0]["service_record_id"] == first
    assert reply(sms, "2") == "rated"  # no code: the most recent open invitation (R3.6)
    assert rows(store, ratings)[1]["service_record_id"] == second


def test_multipart_reply_is_reassembled_once(store: Store, sms: SmsStore) -> None:
    done = shanghai(2026, 11, 23, 10, 0)
    complete(store, "M-1", done)
    invite(sms, done + timedelta(minutes=2))
    text = "2 " + "窗口服务很好，" * 12 + "👍"
    raw = text.encode("utf-16-be")
    cut = 134 + 2 * 0  # cut on a code-unit boundary; the emoji's surrogates sit at the end
    part1, part2 = raw[:cut], raw[cut:]
    assert sms.store_reply("13800138000", "10690012345", part2, 8, concatenation=(7, 2, 2)).status == "waiting"
    assert sms.store_reply("13800138000", "10690012345", part2, 8, concatenation=(7, 2, 2)).status == "repeat"
    assert sms.store_reply("13800138000", "10690012345", part1, 8, concatenation=(7, 2, 1)).status == "rated"
    [rating] = rows(store, ratings)
    assert rating["level"] == int(Level.SATISFIED) and rating["comment"].endswith("👍")


def test_two_instances_never_do_a_step_or_claim_a_message_twice(store: Store) -> None:
    done = shanghai(2026, 11, 23, 10, 0)
    calendar = WorkingDayCalendar()
    for n in range(60):
        complete(store, f"M-{n}", done, phone=f"+86138{n:08d}")
    instances = [SmsStore(store, SmsSettings(), calendar) for _ in range(2)]
    later = done + timedelta(minutes=2)
    barrier = threading.Barrier(2)
    claimed: list[list[int]] = [[], []]

    def work(k: int) -> None:
        barrier.wait()
        instances[k].create_invitations(EPOCH, now=later)
        for _ in range(6):
            instances[k].run_due_steps(now=later, limit=10)
        for _ in range(6):
            claimed[k].extend(m.id for m in instances[k].claim_messages(f"i{k}", 10, lease=60))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    with store.engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(invitations)).scalar() == 60
        assert connection.execute(select(func.count()).select_from(messages)).scalar() == 60
    assert not set(claimed[0]) & set(claimed[1])
    assert len(claimed[0]) + len(claimed[1]) == 60


def test_acknowledgements_written_at_the_driver_read_back_as_the_same_time(store: Store, sms: SmsStore) -> None:
    done = shanghai(2026, 11, 23, 10, 0)
    complete(store, "M-1", done)
    invite(sms, done + timedelta(minutes=2))
    [out] = sms.claim_messages("a", 10, lease=60)
    at = shanghai(2026, 11, 23, 10, 2, 3, 456789)
    sms.record_acks([Ack(out.id, 0, 1, 2, "00AbC", False)], now=at)
    [part] = rows(store, message_parts)
    assert part["submitted_at"] == at and part["smsc_id"] == "abc" and part["smsc_id_raw"] == "00AbC"


def test_a_theme_is_looked_at_whole_when_its_last_matter_changes(store: Store, sms: SmsStore) -> None:
    """R1.6 with the scheduler's watermark: T-0 was seen while the theme was in progress; the theme
    is invited when T-1 completes, even though T-1 was rated on its own at once, and on T-0, the
    matter that is left and has a mobile (T-1 has none)."""
    done = shanghai(2026, 11, 23, 10, 0)
    t0 = complete(store, "T-0", done, theme_id="THEME-1")
    store.upsert_service_records(
        [ServiceRecordInput(id="T-1", kind=ServiceKind.MATTER, theme_id="THEME-1")]  # type: ignore[arg-type]
    )
    time.sleep(0.01)
    other = complete(store, "OTHER", done, phone=OTHER_PHONE)  # moves the watermark past T-0
    watermark = sms.create_invitations(EPOCH, now=done + timedelta(minutes=1))
    assert [row["service_record_id"] for row in rows(store, invitations)] == [other]  # the theme is in progress
    time.sleep(0.01)
    last = done + timedelta(days=1)
    t1 = complete(store, "T-1", last, phone=None, theme_id="THEME-1")
    web_rating(store, t1, last)
    sms.create_invitations(watermark, now=last + timedelta(minutes=1))
    [invitation] = rows(store, invitations, invitations.c.service_record_id != other)
    assert invitation["service_record_id"] == t0
    assert invitation["closes_at"] == sms.settings.schedule.closes_at(last, sms.calendar)


def test_a_theme_from_before_whose_first_invitation_closed_still_asks_the_others(store: Store, sms: SmsStore) -> None:
    """One invitation per matter before R1.6; the first one closed with T-0's own default: the
    open one is the group's question now, and gets its reminder and its default."""
    done = shanghai(2026, 11, 23, 10, 0)
    t0, t1 = (complete(store, f"T-{n}", done, theme_id="THEME-1") for n in range(2))
    sent = done + timedelta(minutes=2)
    with store.engine.begin() as connection:
        for n, (item, status) in enumerate(((t0, "closed"), (t1, "sent"))):
            connection.execute(
                insert(invitations).values(
                    service_record_id=item, channel="sms", extension_code=f"000{n + 1}", created_at=done,
                    status=status, send_after=done, sent_at=sent, closes_at=shanghai(2026, 11, 30, 10, 0),
                    next_step_at=None if status == "closed" else sent + timedelta(hours=24),
                )
            )  # fmt: skip
        store.add_rating(
            connection, service_record_id=t0, level=Level.BASICALLY_SATISFIED, channel=Channel.SYSTEM,
            raw_input=None, rated_at=done, is_default=True,
        )  # fmt: skip
    assert sms.run_due_steps(now=done + timedelta(hours=25)).reminders == 1
    assert sms.run_due_steps(now=shanghai(2026, 12, 1, 10, 0)).defaults == 1
    assert [r["overall"] for r in rows(store, ratings, ratings.c.service_record_id == t1)] == [True]


def _batches(prefix: str, count: int, done: datetime) -> list[ServiceRecordInput]:
    """``count`` one-item batches, written by one upsert: one ``updated_at`` for all, as an import chunk."""
    return [
        ServiceRecordInput(  # type: ignore[arg-type]
            id=f"{prefix}-{n}", kind=ServiceKind.MATTER, completed_at=done, mobile=PHONE, batch_id=f"{prefix}B-{n}"
        )
        for n in range(count)
    ]


def test_more_records_of_one_moment_than_a_page_still_move_the_scan_on(store: Store, sms: SmsStore) -> None:
    """An import chunk writes its records at one moment: a round that pages by time alone would read
    the same page again and again, and the records after it would never be invited."""
    done = shanghai(2026, 11, 23, 10, 0)
    store.upsert_service_records(_batches("A", 12, done))
    time.sleep(0.01)
    complete(store, "L-1", done)
    time.sleep(0.01)
    store.upsert_service_records(_batches("B", 3, done))
    position = sms.create_invitations(EPOCH, now=done + timedelta(minutes=1), limit=5)
    assert len(rows(store, invitations)) == 16  # pages by (updated_at, id): four pages, one call
    assert position == ScanPosition(rows(store, service_records)[-1]["updated_at"], 16)


def test_a_large_import_is_taken_a_few_pages_a_round(store: Store, sms: SmsStore) -> None:
    """The store's other work (ratings, the API) waits for a round: a 100,000-record import is
    read ``pages`` pages at a time, each round going on from where the last stopped."""
    done = shanghai(2026, 11, 23, 10, 0)
    store.upsert_service_records(_batches("A", 12, done))
    position = sms.create_invitations(EPOCH, now=done + timedelta(minutes=1), limit=5, pages=2)
    assert len(rows(store, invitations)) == 10
    sms.create_invitations(position, now=done + timedelta(minutes=1), limit=5, pages=2)
    assert len(rows(store, invitations)) == 12


def test_a_batch_sharing_an_item_with_a_theme_is_still_asked(store: Store, sms: SmsStore) -> None:
    """R1.6: an item of a batch that is also in a theme goes with its theme; the batch's other items
    (outside the theme) are the batch, asked once on their own."""
    done = shanghai(2026, 11, 23, 10, 0)
    in_theme = complete(store, "X", done, batch_id="B-1", theme_id="T-1")
    invite(sms, done + timedelta(minutes=1))
    outside = complete(store, "Y", done + timedelta(minutes=5), batch_id="B-1")
    invite(sms, done + timedelta(minutes=6))
    assert sorted(row["service_record_id"] for row in rows(store, invitations)) == [in_theme, outside]


def test_a_themes_overall_rating_does_not_rate_the_batch_of_one_of_its_matters(store: Store, sms: SmsStore) -> None:
    """R1.6: B-1 = {X in theme T-1, Y alone}. The theme's overall rating (kept on X) covers the
    theme, not Y: Y's batch invitation still gets its reminder and, unanswered, its default."""
    done = shanghai(2026, 11, 23, 10, 0)
    x = complete(store, "X", done, batch_id="B-1", theme_id="T-1")
    y = complete(store, "Y", done, phone=OTHER_PHONE, batch_id="B-1")
    invite(sms, done + timedelta(minutes=1))
    with store.engine.begin() as connection:
        store.add_rating(
            connection, service_record_id=x, level=Level.SATISFIED, channel=Channel.SMS, raw_input="2",
            rated_at=done + timedelta(hours=2), overall=True,
        )  # fmt: skip
    assert sms.run_due_steps(now=done + timedelta(hours=25)).reminders == 1
    sms.run_due_steps(now=shanghai(2026, 12, 1, 10, 0))
    assert [r["is_default"] for r in rows(store, ratings, ratings.c.service_record_id == y)] == [True]


# -- batches and themes over their whole life (SPEC R1.6) ------------------------------------------
# Items completing at different times, records joining a group after they were invited, groups
# rated item by item, the calendar of next year not known yet: each case was a citizen asked
# never, twice, or left without any rating after the window (found in review, session 8).


def _days(sms: SmsStore, start: datetime, n: int) -> None:
    for day in range(1, n):
        sms.run_due_steps(now=start + timedelta(days=day))


def test_a_matter_added_to_a_theme_rated_matter_by_matter_is_covered(store: Store, sms: SmsStore) -> None:
    """Theme {T-0, T-1} invited on T-0; both rated on their own -> invitation 'rated'.
    T-2 joins the theme later (completed): _group_invited sees T-0's invitation, so T-2 is never
    invited and never gets a default; no rating covers it after the window."""
    done = shanghai(2026, 11, 23, 10, 0)
    t0, t1 = (complete(store, f"T-{n}", done, theme_id="TH") for n in range(2))
    invite(sms, done + timedelta(minutes=2))
    web_rating(store, t0, done + timedelta(minutes=5))
    web_rating(store, t1, done + timedelta(minutes=6))
    sms.run_due_steps(now=done + timedelta(hours=25))
    assert rows(store, invitations)[0]["status"] == "rated"
    later = done + timedelta(hours=26)
    time.sleep(0.01)
    t2 = complete(store, "T-2", later, theme_id="TH")
    sms.create_invitations(EPOCH, now=later + timedelta(minutes=1))
    _days(sms, later, 15)
    covering = rows(store, ratings, ratings.c.service_record_id == t2)
    overall = [r for r in rows(store, ratings) if r["overall"]]
    assert covering or overall, (
        f"T-2 has no rating, no overall; invitations={[dict(r) for r in rows(store, invitations)]}"
    )


def test_a_rated_record_joining_a_theme_leaves_no_other_matter_unrated(store: Store, sms: SmsStore) -> None:
    """R invited alone and rated by the reply; a later intake update puts R in theme TH with T-2.
    T-2 is never invited (R's invitation counts as the theme's) and gets no default."""
    done = shanghai(2026, 11, 23, 10, 0)
    complete(store, "R", done)
    invite(sms, done + timedelta(minutes=2))
    assert reply(sms, "1") == "rated"
    time.sleep(0.01)
    complete(store, "R", done, theme_id="TH")
    t2 = complete(store, "T-2", done + timedelta(hours=1), theme_id="TH")
    sms.create_invitations(EPOCH, now=done + timedelta(hours=1, minutes=1))
    _days(sms, done, 15)
    covering = rows(store, ratings, ratings.c.service_record_id == t2)
    overall = [x for x in rows(store, ratings) if x["overall"]]
    assert covering or overall, "T-2 is left with no rating and no overall rating covering it"


def test_a_batch_is_texted_on_an_item_completed_later_that_has_the_number(store: Store, sms: SmsStore) -> None:
    """Batch B: B-0 (no mobile) completes first, B-1 (mobile) a few hours later. The batch's
    invitation is made on B-0 (only completed item); once B-1 completes nothing moves it, so the
    citizen is never texted and the batch just gets the default."""
    done = shanghai(2026, 11, 23, 10, 0)
    complete(store, "B-0", done, phone=None, batch_id="B")
    store.upsert_service_records(
        [ServiceRecordInput(id="B-1", kind=ServiceKind.MATTER, mobile=PHONE, batch_id="B")]  # type: ignore[arg-type]
    )
    invite(sms, done + timedelta(minutes=2))
    time.sleep(0.01)
    complete(store, "B-1", done + timedelta(hours=2), batch_id="B")
    for h in range(3, 200, 1):
        sms.create_invitations(EPOCH, now=done + timedelta(hours=h))
        sms.run_due_steps(now=done + timedelta(hours=h))
    out = [m["kind"] for m in rows(store, messages) if m["direction"] == "out"]
    assert out, f"never texted; ratings={[(x['service_record_id'], x['is_default']) for x in rows(store, ratings)]}"


def test_a_theme_window_waiting_for_the_calendar_runs_from_the_last_matter(store: Store, sms: SmsStore) -> None:
    """Theme T-0 completed 2026-12-18, T-1 2026-12-28 (window into 2027, unknown): invitation
    made with closes_at NULL; _step recomputes it from the invited row's own completed_at
    (T-0, 2026-12-18) -> a window already closed -> immediate overall default, never asked."""
    first, last = shanghai(2026, 12, 18, 10, 0), shanghai(2026, 12, 28, 10, 0)
    complete(store, "T-0", first, theme_id="TH")
    complete(store, "T-1", last, theme_id="TH")
    sms.create_invitations(EPOCH, now=last + timedelta(minutes=1))
    [inv] = rows(store, invitations)
    assert inv["closes_at"] is None
    steps = sms.run_due_steps(now=last + timedelta(hours=1))
    [inv] = rows(store, invitations)
    print(steps, dict(inv))
    assert (steps.defaults == 0 and inv["closes_at"] is None) or inv["closes_at"] > last, (steps, inv["closes_at"])


def test_a_theme_rated_matter_by_matter_with_a_batch_inside_is_not_asked_again(store: Store, sms: SmsStore) -> None:
    """Theme TH: matter X as a batch {X-a, X-b} and matter Y. The citizen rates X-a (which rates
    the batch, R1.6) and Y on their own: every matter is rated; the theme should not be asked
    again. _themes_with_unrated_matters ignores the batch -> reminder + overall default."""
    done = shanghai(2026, 11, 23, 10, 0)
    xa = complete(store, "X-a", done, theme_id="TH", batch_id="BX", matter_code="X")
    complete(store, "X-b", done, theme_id="TH", batch_id="BX", matter_code="X")
    y = complete(store, "Y", done, theme_id="TH", matter_code="Y")
    invite(sms, done + timedelta(minutes=2))
    web_rating(store, xa, done + timedelta(minutes=5))
    web_rating(store, y, done + timedelta(minutes=6))
    steps = sms.run_due_steps(now=done + timedelta(hours=25))
    _days(sms, done, 15)
    kinds = [m["kind"] for m in rows(store, messages) if m["direction"] == "out"]
    defaults = [x for x in rows(store, ratings) if x["is_default"]]
    assert steps.reminders == 0 and not defaults, (kinds, [(d["service_record_id"], d["overall"]) for d in defaults])


def test_a_theme_is_asked_on_the_only_number_that_can_get_it(store: Store, sms: SmsStore) -> None:
    """Theme {A (mobile, rated on its own at the window), B (no mobile)}: the invitation goes to B
    (the only unrated matter) which cannot get an SMS -> the overall question for B is never sent,
    though A's number could get it; B gets the overall default."""
    done = shanghai(2026, 11, 23, 10, 0)
    a = complete(store, "A", done, theme_id="TH")
    web_rating(store, a, done)
    complete(store, "B", done, phone=None, theme_id="TH")
    for h in range(0, 200, 3):
        sms.create_invitations(EPOCH, now=done + timedelta(hours=h, minutes=2))
        sms.run_due_steps(now=done + timedelta(hours=h, minutes=2))
    out = [m["kind"] for m in rows(store, messages) if m["direction"] == "out"]
    assert out, "the citizen, reachable on A's number, was never asked for the theme's overall rating"


def test_an_invitation_whose_record_joins_an_unfinished_theme_waits_for_it(store: Store, sms: SmsStore) -> None:
    """R completes alone, its invitation is made (send in 60 s); the intake then links R to theme
    TH whose other matter T-2 is not completed. The invitation goes out as the theme's overall
    question anyway, and its window (from R's completion) ends with an overall default covering
    T-2 although T-2 completes after it."""
    done = shanghai(2026, 11, 23, 10, 0)
    complete(store, "R", done)
    sms.create_invitations(EPOCH, now=done)
    time.sleep(0.01)
    complete(store, "R", done, theme_id="TH")
    store.upsert_service_records(
        [ServiceRecordInput(id="T-2", kind=ServiceKind.MATTER, mobile=PHONE, theme_id="TH")]  # type: ignore[arg-type]
    )
    steps = sms.run_due_steps(now=done + timedelta(minutes=2))
    bodies = [m["body"] for m in rows(store, messages) if m["direction"] == "out"]
    assert steps.invitations == 0, bodies


def test_reply_to_superseded_but_sent_invitation_rates_the_batch_once(store: Store, sms: SmsStore) -> None:
    done = shanghai(2026, 11, 23, 10, 0)
    items = [complete(store, f"B-{n}", done, batch_id="BATCH-1") for n in range(2)]
    sent = done + timedelta(minutes=2)
    with store.engine.begin() as connection:
        for n, item in enumerate(items):
            connection.execute(
                insert(invitations).values(
                    service_record_id=item,
                    channel="sms",
                    extension_code=f"000{n + 1}",
                    created_at=done,
                    status="sent",
                    send_after=done,
                    sent_at=sent,
                    closes_at=shanghai(2026, 11, 30, 10, 0),
                    next_step_at=sent,
                )
            )
    sms.run_due_steps(now=sent)
    assert reply(sms, "2", to="106900123450002") == "rated"
    _days(sms, done, 15)
    assert reply(sms, "1", to="106900123450001") in ("already_rated", "closed")
    assert [(x["service_record_id"], x["is_default"]) for x in rows(store, ratings) if not x["is_attempt"]] == [
        (items[1], False)
    ]
    assert [m["kind"] for m in rows(store, messages) if m["direction"] == "out" and m["kind"] != "answer"] == []


def test_group_all_opted_out_gets_the_default(store: Store, sms: SmsStore) -> None:
    done = shanghai(2026, 11, 23, 10, 0)
    with store.engine.begin() as connection:
        connection.execute(
            insert(opt_outs).values(phone_hash=store.protector.lookup_hash(PHONE), channel="sms", created_at=done)
        )
    first = complete(store, "B-0", done, batch_id="B")
    complete(store, "B-1", done, batch_id="B")
    for h in range(0, 200, 3):
        sms.create_invitations(EPOCH, now=done + timedelta(hours=h, minutes=2))
        sms.run_due_steps(now=done + timedelta(hours=h, minutes=2))
    assert [m for m in rows(store, messages) if m["direction"] == "out"] == []
    assert [(x["service_record_id"], x["is_default"]) for x in rows(store, ratings)] == [(first, True)]


def out(store: Store) -> list[str]:
    return [m["kind"] for m in rows(store, messages) if m["direction"] == "out"]


def test_a_sent_theme_invitation_keeps_its_deadline_when_a_matter_joins(store: Store, sms: SmsStore) -> None:
    """Theme {T-0, T-1} completed and asked (SMS sent, deadline told); T-2 is then linked to the theme
    and never completes (withdrawn). The invitation keeps its deadline and ends in the default (R3.4)."""
    done = shanghai(2026, 11, 23, 10, 0)
    complete(store, "T-0", done, theme_id="TH")
    complete(store, "T-1", done, theme_id="TH")
    invite(sms, done + timedelta(minutes=2))
    [inv] = rows(store, invitations)
    assert inv["status"] == "sent"
    store.upsert_service_records(
        [ServiceRecordInput(id="T-2", kind=ServiceKind.MATTER, mobile=PHONE, theme_id="TH")]  # type: ignore[arg-type]
    )
    for h in range(1, 24 * 20):
        sms.run_due_steps(now=done + timedelta(hours=h, minutes=3))
    [inv] = rows(store, invitations)
    assert [r["is_default"] for r in rows(store, ratings)] == [True]


def test_a_batch_first_on_a_land_line_is_texted_soon_after_its_mobile_item(store: Store, sms: SmsStore) -> None:
    """B-0 (a land line) completes first and gets the batch's invitation; B-1 (a mobile) completes
    2 h later: the invitation moves to B-1 within the hour, not at B-0's window end (R3.1, R3.3)."""
    done = shanghai(2026, 11, 23, 10, 0)
    complete(store, "B-0", done, phone="+862087654321", batch_id="B")
    sms.create_invitations(EPOCH, now=done + timedelta(minutes=2))
    sms.run_due_steps(now=done + timedelta(minutes=2))
    time.sleep(0.01)
    later = done + timedelta(hours=2)
    complete(store, "B-1", later, batch_id="B")
    first = None
    for h in range(3, 24 * 12):
        now = done + timedelta(hours=h)
        sms.create_invitations(EPOCH, now=now)
        sms.run_due_steps(now=now)
        if first is None and out(store):
            first = now
    assert len(rows(store, invitations)) == 1
    assert first is not None and first <= later + timedelta(hours=24)
