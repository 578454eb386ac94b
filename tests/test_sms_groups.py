"""Batches and themes (SPEC R1.6) over their whole life in the SMS schedule: items completing at
different times, records joining a group after they were invited, groups rated item by item, and
the calendar of next year not known yet. Each case was a citizen asked never, twice, or left
without any rating after the window (found in review, session 8)."""

from __future__ import annotations

import time
from datetime import datetime, timedelta

import pytest

from gateway.intake import ServiceRecordInput
from gateway.rating import ServiceKind
from gateway.sms.settings import SmsSettings
from gateway.workdays import WorkingDayCalendar
from storage.schema import invitations, messages, ratings
from storage.sms import SmsStore
from storage.store import Store
from tests.test_sms_store import (
    DAYTIME,
    EPOCH,
    PHONE,
    complete,
    invite,
    reply,
    rows,
    shanghai,
    web_rating,
)


@pytest.fixture(autouse=True)
def daytime(monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps run at 10:00 Shanghai, whatever the hour (quiet hours, R3.2)."""
    monkeypatch.setattr("storage.sms.utcnow", lambda: DAYTIME)


@pytest.fixture
def sms(store: Store) -> SmsStore:
    return SmsStore(store, SmsSettings(), WorkingDayCalendar())


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
    from sqlalchemy import insert

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
    from sqlalchemy import insert

    from storage.schema import opt_outs

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
