"""The invitation schedule (gateway.sms.schedule, SPEC R3.1-R3.4, R3.8, R3.10) on fixed dates.

The dates run over the 2026 official calendar: Spring Festival holidays 2026-02-15..23 with
make-up workdays Saturday 2026-02-14 and Saturday 2026-02-28; National Day holidays
2026-10-01..07 with make-up workdays Sunday 2026-09-20 and Saturday 2026-10-10 (and the
Mid-Autumn Festival on Friday 2026-09-25). ``test_the_2026_calendar_is_as_assumed`` checks
them against the WorkingDayCalendar first.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import load_config
from gateway.rating import Level
from gateway.sms.schedule import (
    Cap,
    Done,
    InvitationState,
    NextAction,
    QuietHours,
    RateCaps,
    RecordDefaultRating,
    ScheduleSettings,
    SendInvitation,
    SendReminder,
    SentMessage,
    closes_at,
    next_action,
    send_time,
)
from gateway.workdays import SHANGHAI, Period, WorkingDayCalendar

CALENDAR = WorkingDayCalendar()
FIVE_WORKING_DAYS = Period("working", 5)
SEVEN_DAYS = Period("natural", 7)
NIGHT = QuietHours(time(21), time(8))
NO_CAPS = RateCaps(caps=())
SETTINGS = ScheduleSettings()


def at(text: str) -> datetime:
    """A Shanghai wall-clock time: at("2026-02-13 20:59")."""
    return datetime.fromisoformat(text).replace(tzinfo=SHANGHAI)


def test_the_2026_calendar_is_as_assumed() -> None:
    def working(first: str, last: str) -> set[bool]:
        start, end = date.fromisoformat(first), date.fromisoformat(last)
        return {CALENDAR.is_working_day(start + timedelta(days=n)) for n in range((end - start).days + 1)}

    assert working("2026-02-15", "2026-02-23") == {False}
    assert working("2026-10-01", "2026-10-07") == {False}
    for make_up in ("2026-02-14", "2026-02-28", "2026-09-20", "2026-10-10"):
        assert CALENDAR.is_working_day(date.fromisoformat(make_up)), make_up
    assert not CALENDAR.is_working_day(date(2026, 9, 25))


# --- quiet hours (SPEC R3.2) ----------------------------------------------------------------------

QUIET_HOURS = [
    # quiet hours, moment, first moment a send may go
    (NIGHT, "2026-02-13 20:59", "2026-02-13 20:59"),
    (NIGHT, "2026-02-13 20:59:59.999999", "2026-02-13 20:59:59.999999"),
    (NIGHT, "2026-02-13 21:00", "2026-02-14 08:00"),
    (NIGHT, "2026-02-13 23:45", "2026-02-14 08:00"),
    (NIGHT, "2026-02-14 00:00", "2026-02-14 08:00"),
    (NIGHT, "2026-02-14 07:59", "2026-02-14 08:00"),
    (NIGHT, "2026-02-14 07:59:59.999999", "2026-02-14 08:00"),
    (NIGHT, "2026-02-14 08:00", "2026-02-14 08:00"),
    (NIGHT, "2026-12-31 22:00", "2027-01-01 08:00"),  # over the year's end
    (QuietHours(time(12), time(14)), "2026-02-13 11:59", "2026-02-13 11:59"),  # not crossing midnight
    (QuietHours(time(12), time(14)), "2026-02-13 12:00", "2026-02-13 14:00"),
    (QuietHours(time(12), time(14)), "2026-02-13 13:59", "2026-02-13 14:00"),
    (QuietHours(time(12), time(14)), "2026-02-13 14:00", "2026-02-13 14:00"),
    (QuietHours(time(12), time(14)), "2026-02-13 23:00", "2026-02-13 23:00"),
    (QuietHours(time(8), time(8)), "2026-02-13 03:00", "2026-02-13 03:00"),  # empty span
]


@pytest.mark.parametrize(("quiet", "moment", "allowed"), QUIET_HOURS)
def test_quiet_hours(quiet: QuietHours, moment: str, allowed: str) -> None:
    assert quiet.next_allowed(at(moment)) == at(allowed)
    assert quiet.contains(at(moment)) == (moment != allowed)


def test_quiet_hours_are_read_in_shanghai_whatever_the_timezone_given() -> None:
    utc_evening = datetime(2026, 2, 13, 13, 30, tzinfo=UTC)  # 21:30 in Shanghai
    assert NIGHT.next_allowed(utc_evening) == at("2026-02-14 08:00")
    with pytest.raises(ValueError, match="no timezone"):
        NIGHT.contains(datetime(2026, 2, 13, 21, 30))


def test_quiet_hours_from_config() -> None:
    assert QuietHours.from_config((time(21), time(8))) == NIGHT
    assert QuietHours.from_config(None) is None


# --- the rating window (SPEC R3.4) --------------------------------------------------------------

WINDOWS = [
    # completed at, period, window closes at
    ("2026-02-10 10:00", FIVE_WORKING_DAYS, "2026-02-24 10:00"),  # Tue: 11, 12, 13, 14 (Sat, make-up), 24
    ("2026-02-12 18:00", FIVE_WORKING_DAYS, "2026-02-26 18:00"),  # Thu: 13, 14, 24, 25, 26
    ("2026-02-13 20:30", FIVE_WORKING_DAYS, "2026-02-27 20:30"),  # Fri evening: 14, 24, 25, 26, 27
    ("2026-02-14 16:00", FIVE_WORKING_DAYS, "2026-02-28 16:00"),  # make-up Sat: 24-27, 28 (Sat, make-up)
    ("2026-02-20 11:00", FIVE_WORKING_DAYS, "2026-02-28 11:00"),  # in the holiday: 24-28
    ("2026-09-18 20:00", FIVE_WORKING_DAYS, "2026-09-24 20:00"),  # Fri: 20 (Sun, make-up), 21-24
    ("2026-09-24 09:00", FIVE_WORKING_DAYS, "2026-10-09 09:00"),  # Mid-Autumn, National Day: 28-30, 8, 9
    ("2026-09-30 09:00", FIVE_WORKING_DAYS, "2026-10-13 09:00"),  # 8, 9, 10 (Sat, make-up), 12, 13
    ("2026-02-13 20:30", SEVEN_DAYS, "2026-02-20 20:30"),  # natural days ignore holidays
    ("2026-09-30 09:00", SEVEN_DAYS, "2026-10-07 09:00"),
]


@pytest.mark.parametrize(("completed", "period", "closes"), WINDOWS)
def test_rating_window_closes_after_the_period(completed: str, period: Period, closes: str) -> None:
    assert closes_at(at(completed), period, CALENDAR) == at(closes)


# --- the next action (SPEC R3.1-R3.4, R3.8) -----------------------------------------------------


def state(completed: str, period: Period = FIVE_WORKING_DAYS, **changes: object) -> InvitationState:
    completed_at = at(completed)
    fields: dict[str, object] = {"completed_at": completed_at, "closes_at": closes_at(completed_at, period, CALENDAR)}
    for name, value in changes.items():
        fields[name] = at(value) if isinstance(value, str) else value
    return InvitationState(**fields)  # type: ignore[arg-type]


SCHEDULE = [
    # what happens, the invitation's state, now, the next action
    (
        "invitation a minute after completion",
        state("2026-02-10 10:00"),
        "2026-02-10 10:00",
        SendInvitation(at("2026-02-10 10:01")),
    ),
    (
        "invitation due at 20:59:30 goes at once",
        state("2026-02-13 20:58:30"),
        "2026-02-13 20:59:30",
        SendInvitation(at("2026-02-13 20:59:30")),
    ),
    (
        "completed on a Friday evening at 20:59:30: the invitation waits for Saturday 08:00",
        state("2026-02-13 20:59:30"),
        "2026-02-13 20:59:30",
        SendInvitation(at("2026-02-14 08:00")),
    ),
    (
        "completed in the night: invitation at 08:00",
        state("2026-02-11 06:30"),
        "2026-02-11 06:30",
        SendInvitation(at("2026-02-11 08:00")),
    ),
    (
        "scheduler down in the evening: the late invitation waits for the morning",
        state("2026-02-10 18:00"),
        "2026-02-10 23:10",
        SendInvitation(at("2026-02-11 08:00")),
    ),
    (
        "scheduler down in the day: the late invitation goes now",
        state("2026-02-10 10:00"),
        "2026-02-10 15:00",
        SendInvitation(at("2026-02-10 15:00")),
    ),
    (
        "reminder 24 h after completion (Friday evening → Saturday evening)",
        state("2026-02-13 20:30", sent_at="2026-02-13 20:31"),
        "2026-02-13 20:31",
        SendReminder(at("2026-02-14 20:31")),
    ),
    (
        "reminder due at 20:59:30 is not in the quiet hours",
        state("2026-02-13 20:58:30", sent_at="2026-02-13 20:59:30"),
        "2026-02-14 20:59:30",
        SendReminder(at("2026-02-14 20:59:30")),
    ),
    (
        "reminder found due during the quiet hours waits for 08:00",
        state("2026-02-10 20:30", sent_at="2026-02-10 20:31"),
        "2026-02-11 21:05",
        SendReminder(at("2026-02-12 08:00")),
    ),
    (
        "invitation delayed to the morning: the reminder comes a day after it, not hours after",
        state("2026-02-10 22:00", sent_at="2026-02-11 08:00"),
        "2026-02-11 08:00",
        SendReminder(at("2026-02-12 08:00")),
    ),
    (
        "reminder over the Spring Festival: the holiday does not stop a reminder",
        state("2026-02-14 10:00", sent_at="2026-02-14 10:01"),
        "2026-02-14 10:01",
        SendReminder(at("2026-02-15 10:01")),
    ),
    (
        "rated: nothing more",
        state("2026-02-10 10:00", sent_at="2026-02-10 10:01", rated=True),
        "2026-02-10 12:00",
        Done(),
    ),
    (
        "rated before the invitation went: never sent, never reminded",
        state("2026-02-10 10:00", rated=True),
        "2026-02-10 10:00",
        Done(),
    ),
    (
        "opted out before the invitation: no invitation, the default is still due",
        state("2026-02-12 18:00", opted_out=True),
        "2026-02-12 18:00",
        RecordDefaultRating(at("2026-02-26 18:00")),
    ),
    (
        "opted out after the invitation: no reminder",
        state("2026-02-12 18:00", sent_at="2026-02-12 18:01", opted_out=True),
        "2026-02-13 18:01",
        RecordDefaultRating(at("2026-02-26 18:00")),
    ),
    (
        "reminded: the default after 5 working days across the Spring Festival",
        state("2026-02-12 18:00", sent_at="2026-02-12 18:01", reminded_at="2026-02-13 18:01"),
        "2026-02-13 18:01",
        RecordDefaultRating(at("2026-02-26 18:00"), Level.BASICALLY_SATISFIED),
    ),
    (
        "default across National Day and its make-up Saturday",
        state("2026-09-30 09:00", sent_at="2026-09-30 09:01", reminded_at="2026-10-01 09:01"),
        "2026-10-01 09:01",
        RecordDefaultRating(at("2026-10-13 09:00")),
    ),
    (
        "natural-day period: the default 7 days after completion",
        state("2026-02-13 20:30", SEVEN_DAYS, sent_at="2026-02-13 20:31", reminded_at="2026-02-14 20:31"),
        "2026-02-14 20:31",
        RecordDefaultRating(at("2026-02-20 20:30")),
    ),
    (
        "window long closed and never invited: the default, stamped at the window's end",
        state("2026-02-10 10:00"),
        "2026-03-05 09:00",
        RecordDefaultRating(at("2026-02-24 10:00")),
    ),
    (
        "a reminder that could only go after a one-day window closes is not sent",
        state("2026-02-13 20:59:30", Period("natural", 1), sent_at="2026-02-14 08:00"),
        "2026-02-14 08:00",
        RecordDefaultRating(at("2026-02-14 20:59:30")),
    ),
]


@pytest.mark.parametrize(("story", "invitation", "now", "expected"), SCHEDULE, ids=[row[0] for row in SCHEDULE])
def test_next_action(story: str, invitation: InvitationState, now: str, expected: NextAction) -> None:
    assert next_action(invitation, at(now), ScheduleSettings(caps=NO_CAPS)) == expected


def test_without_quiet_hours_a_night_send_goes_at_once() -> None:
    settings_ = ScheduleSettings(quiet_hours=None, caps=NO_CAPS)
    assert next_action(state("2026-02-13 23:00"), at("2026-02-13 23:00"), settings_) == SendInvitation(
        at("2026-02-13 23:01")
    )


def test_settings_from_the_configuration() -> None:
    sms = load_config(environ={}).sms
    assert ScheduleSettings.from_config(sms) == ScheduleSettings()
    uncapped = ScheduleSettings.from_config(sms, caps=NO_CAPS)
    assert uncapped.caps == NO_CAPS
    assert uncapped.closes_at(at("2026-02-12 18:00"), CALENDAR) == at("2026-02-26 18:00")


# --- per-number caps (SPEC R3.10) ---------------------------------------------------------------

NOW = at("2026-02-10 10:00")


def sent_before(*seconds: float, content: str | None = None) -> list[SentMessage]:
    return [SentMessage(NOW - timedelta(seconds=s), content) for s in seconds]


CAPS = [
    # sent to this number already, content about to go, earliest moment for it
    ([], None, NOW),
    (sent_before(10, 20), None, NOW),  # 2 in the minute: a third may go
    (sent_before(10, 20, 30), None, NOW + timedelta(seconds=30)),  # 3 a minute: wait for the oldest to age
    (sent_before(5, 10, 20, 30), None, NOW + timedelta(seconds=40)),  # already over: wait for two
    (sent_before(*range(300, 3300, 300)), None, NOW + timedelta(minutes=10)),  # 10 in the hour
    (sent_before(*range(600, 50 * 1500, 1500)), None, NOW + timedelta(days=1) - timedelta(seconds=74100)),
    (sent_before(3 * 3600, content="邀请A"), "邀请A", NOW + timedelta(hours=21)),  # same content: once a day
    (sent_before(3 * 3600, content="邀请A"), "邀请B", NOW),
    (sent_before(3 * 3600, content="邀请A"), None, NOW),  # content unknown: the other caps only
    (sent_before(25 * 3600, content="邀请A"), "邀请A", NOW),  # a day has passed
]


@pytest.mark.parametrize(("sent", "content", "earliest"), CAPS)
def test_carrier_caps(sent: list[SentMessage], content: str | None, earliest: datetime) -> None:
    assert RateCaps().earliest(sent, NOW, content) == earliest


def test_fifty_a_day_cap_counts_a_sliding_day() -> None:
    sent = sent_before(*range(600, 50 * 1500, 1500))  # 50 sends, the oldest 20h 25m ago
    assert len(sent) == 50
    oldest = min(message.at for message in sent)
    assert RateCaps().earliest(sent, NOW) == oldest + timedelta(days=1)


def test_caps_are_configurable() -> None:
    one_a_minute = RateCaps(caps=(Cap(1, timedelta(minutes=1)),))
    assert one_a_minute.earliest(sent_before(10), NOW) == NOW + timedelta(seconds=50)
    assert one_a_minute.longest_window == timedelta(minutes=1)
    with pytest.raises(ValueError, match="limit"):
        Cap(0, timedelta(minutes=1))


def test_caps_defer_the_invitation_never_drop_it() -> None:
    sent = sent_before(10, 20, 30)
    action = next_action(state("2026-02-10 09:58"), NOW, SETTINGS, sent)
    assert action == SendInvitation(NOW + timedelta(seconds=30))


def test_caps_pushing_a_send_into_the_quiet_hours_wait_for_the_morning() -> None:
    evening = at("2026-02-13 20:59:40")
    sent = [SentMessage(at("2026-02-13 20:59:10")), SentMessage(at("2026-02-13 20:59:20")), SentMessage(evening)]
    assert send_time(evening, evening, SETTINGS, sent) == at("2026-02-14 08:00")


def test_same_content_cap_defers_a_repeated_reminder_text_by_a_day_then_out_of_the_night() -> None:
    sent = [SentMessage(at("2026-02-10 22:30"), "提醒")]
    assert send_time(at("2026-02-11 09:00"), at("2026-02-11 09:00"), SETTINGS, sent, "提醒") == at("2026-02-12 08:00")


# --- properties ---------------------------------------------------------------------------------

moments = st.datetimes(min_value=datetime(2026, 1, 5), max_value=datetime(2026, 11, 30)).map(
    lambda naive: naive.replace(tzinfo=SHANGHAI)
)


@given(moments, st.integers(min_value=0, max_value=3 * 24 * 60), st.lists(st.integers(0, 26 * 60), max_size=60))
@settings(max_examples=200, deadline=None)
def test_a_send_is_never_early_never_at_night_and_within_the_caps(
    completed: datetime, minutes_later: int, sent_minutes_ago: list[int]
) -> None:
    now = completed + timedelta(minutes=minutes_later)
    sent = [SentMessage(now - timedelta(minutes=m)) for m in sent_minutes_ago]
    invitation = state(completed.strftime("%Y-%m-%d %H:%M:%S"))
    action = next_action(invitation, now, SETTINGS, sent)
    if isinstance(action, SendInvitation | SendReminder):
        assert action.at >= now
        assert action.at < invitation.closes_at
        assert not NIGHT.contains(action.at)
        assert RateCaps().earliest(sent, action.at) == action.at
    else:
        assert action == RecordDefaultRating(invitation.closes_at)
