"""The working-day calendar behind SPEC R3.4 (default rating) and R4.2 (bad-rating deadlines).

Expected holidays are checked against ``chinese_calendar``'s own data, and the properties use the
library directly as the oracle, so the calendar is never tested against itself alone.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import get_args
from zoneinfo import ZoneInfo

import chinese_calendar
import pytest
from chinese_calendar import constants as library_data
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.workdays import (
    SHANGHAI,
    CalendarOverrideError,
    CalendarUnknownError,
    Period,
    PeriodKind,
    WorkingDayCalendar,
)

CALENDAR = WorkingDayCalendar()
FIRST_KNOWN = date(2004, 1, 1)
# Late enough for 30 working days to stay inside 2026, the library's last year.
LAST_START = date(2026, 10, 31)
OFFICE_CLOSE = time(17, 30)
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None)

known_days = st.dates(min_value=FIRST_KNOWN, max_value=LAST_START)
working_counts = st.integers(min_value=1, max_value=15)  # R4.2: 1, 5, 10 and 15 working days
aware_starts = st.datetimes(
    min_value=datetime(2004, 1, 2),
    max_value=datetime(2026, 10, 30),
    timezones=st.sampled_from([SHANGHAI, UTC, ZoneInfo("America/New_York"), ZoneInfo("Europe/Berlin")]),
    allow_imaginary=False,
)
periods = st.builds(Period, st.sampled_from(get_args(PeriodKind)), working_counts)


def shanghai(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=SHANGHAI)


def days(first: str, last: str) -> list[date]:
    start, end = date.fromisoformat(first), date.fromisoformat(last)
    return [start + timedelta(days=offset) for offset in range((end - start).days + 1)]


def library_working_days(start: date, end: date) -> int:
    """Working days in (start, end] counted by chinese_calendar itself."""
    span = (end - start).days
    return sum(chinese_calendar.is_workday(start + timedelta(days=n)) for n in range(1, span + 1))


def override_toml(year: int, holidays: list[date], workdays: list[date]) -> str:
    def listing(dates: list[date]) -> str:
        return ", ".join(f'"{day.isoformat()}"' for day in sorted(dates))

    return f"[{year}]\nholidays = [{listing(holidays)}]\nworkdays = [{listing(workdays)}]\n"


LIBRARY_2026_TOML = override_toml(
    2026,
    [day for day in library_data.holidays if day.year == 2026],
    [day for day in library_data.workdays if day.year == 2026],
)
# Made up for the tests: the 2027 notice is not published yet.
OVERRIDE_2027_TOML = """
# Official schedule for 2027 (国务院办公厅 notice).
[2027]
holidays = ["2027-01-01", "2027-02-08", "2027-02-09", "2027-02-10", "2027-02-11", "2027-02-12"]
workdays = ["2027-02-06", 2027-02-20]
"""


# --- The official calendar, checked against the library's data --------------------------------


@pytest.mark.parametrize(
    ("holidays", "make_up_workdays"),
    [
        pytest.param(
            days("2026-02-15", "2026-02-23"),
            [date(2026, 2, 14), date(2026, 2, 28)],
            id="spring-festival-2026",
        ),
        pytest.param(
            days("2026-10-01", "2026-10-07"),
            [date(2026, 9, 20), date(2026, 10, 10)],
            id="national-day-2026",
        ),
        pytest.param(
            days("2025-01-28", "2025-02-04"),
            [date(2025, 1, 26), date(2025, 2, 8)],
            id="spring-festival-2025",
        ),
        pytest.param(
            days("2025-10-01", "2025-10-08"),
            [date(2025, 9, 28), date(2025, 10, 11)],
            id="national-day-2025",
        ),
    ],
)
def test_r4_2_official_holidays_rest_and_make_up_weekends_work(
    holidays: list[date], make_up_workdays: list[date]
) -> None:
    """SPEC R4.2 counts on the official calendar, 调休 included."""
    assert all(day in library_data.holidays for day in holidays)
    assert all(day in library_data.workdays for day in make_up_workdays)
    assert all(day.weekday() >= 5 for day in make_up_workdays)
    assert not any(CALENDAR.is_working_day(day) for day in holidays)
    assert all(CALENDAR.is_working_day(day) for day in make_up_workdays)


def test_ordinary_weekdays_work_and_weekends_rest() -> None:
    assert CALENDAR.is_working_day(date(2026, 3, 10))  # a Tuesday
    assert not CALENDAR.is_working_day(date(2026, 3, 14))  # a Saturday


# --- Deadlines (SPEC R3.4, R4.2) ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "period", "at", "expected"),
    [
        # Friday before Spring Festival 2026: Sat 14 Feb works (调休), 15-23 Feb rest.
        ("2026-02-13T10:00", Period("working", 5), None, "2026-02-27T10:00"),
        ("2026-02-13T17:00", Period("working", 1), None, "2026-02-14T17:00"),
        ("2026-02-13T17:00", Period("working", 2), OFFICE_CLOSE, "2026-02-24T17:30"),
        # National Day 2026: 1-7 Oct rest, Sat 10 Oct works.
        ("2026-09-30T09:15", Period("working", 1), None, "2026-10-08T09:15"),
        ("2026-09-30T09:15", Period("working", 3), None, "2026-10-10T09:15"),
        ("2026-09-30T09:15", Period("working", 15), OFFICE_CLOSE, "2026-10-27T17:30"),
        # Spring Festival 2025: 28 Jan-4 Feb rest, Sat 8 Feb works.
        ("2025-01-27T08:00", Period("working", 5), None, "2025-02-10T08:00"),
        # Guangdong's 7 natural days ignore holidays and office hours.
        ("2026-09-30T09:15", Period("natural", 7), OFFICE_CLOSE, "2026-10-07T09:15"),
    ],
)
def test_r3_4_and_r4_2_deadlines_across_official_holidays(
    start: str, period: Period, at: time | None, expected: str
) -> None:
    assert CALENDAR.deadline(shanghai(start), period, at=at) == shanghai(expected)


def test_r3_4_deadline_counts_days_in_shanghai_whatever_the_start_timezone() -> None:
    """16:30 UTC on Friday 13 Feb 2026 is already Saturday 00:30 in Shanghai."""
    start = datetime(2026, 2, 13, 16, 30, tzinfo=UTC)
    due = CALENDAR.deadline(start, Period("working", 1))
    assert due == shanghai("2026-02-24T00:30")
    assert due.tzinfo == SHANGHAI


def test_r3_4_is_within_is_true_only_before_the_deadline() -> None:
    start, period = shanghai("2026-02-13T10:00"), Period("working", 5)
    assert CALENDAR.is_within(start, period, shanghai("2026-02-27T09:59:59"))
    assert not CALENDAR.is_within(start, period, shanghai("2026-02-27T10:00"))
    assert CALENDAR.is_within(start, period, shanghai("2026-02-27T10:00"), at=OFFICE_CLOSE)


def test_naive_start_is_refused_with_a_sentence() -> None:
    with pytest.raises(ValueError, match="has no timezone"):
        CALENDAR.deadline(datetime(2026, 2, 13, 10), Period("working", 5))
    with pytest.raises(ValueError, match=r"moment time .* has no timezone"):
        CALENDAR.is_within(shanghai("2026-02-13T10:00"), Period("natural", 7), datetime(2026, 3, 1))


def test_deadline_time_with_a_timezone_is_refused() -> None:
    with pytest.raises(ValueError, match="without a timezone"):
        CALENDAR.deadline(shanghai("2026-02-13T10:00"), Period("working", 1), at=time(17, 30, tzinfo=UTC))


def test_calendar_takes_dates_not_datetimes() -> None:
    with pytest.raises(TypeError, match="Asia/Shanghai"):
        CALENDAR.is_working_day(datetime(2026, 2, 14, 12, tzinfo=SHANGHAI))  # type: ignore[arg-type]


def test_working_days_after_zero_is_the_day_itself_and_negative_is_refused() -> None:
    assert CALENDAR.working_days_after(date(2026, 2, 15), 0) == date(2026, 2, 15)
    with pytest.raises(ValueError, match="0 or more"):
        CALENDAR.working_days_after(date(2026, 2, 15), -1)


def test_working_days_between_is_zero_for_an_empty_interval() -> None:
    assert CALENDAR.working_days_between(date(2026, 3, 10), date(2026, 3, 10)) == 0
    assert CALENDAR.working_days_between(date(2026, 3, 10), date(2026, 3, 1)) == 0
    assert CALENDAR.working_days_between(date(2026, 2, 13), date(2026, 2, 27)) == 5


# --- Period configuration (SPEC R3.4: either kind is configurable) ------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5 working days", Period("working", 5)),
        ("1 working day", Period("working", 1)),
        ("7 natural days", Period("natural", 7)),
        ("  10 Working Days ", Period("working", 10)),
        ("5w", Period("working", 5)),
        ("7d", Period("natural", 7)),
        ("15 W", Period("working", 15)),
    ],
)
def test_r3_4_period_is_read_from_configuration_text(text: str, expected: Period) -> None:
    assert Period.parse(text) == expected


@pytest.mark.parametrize("text", ["", "5", "five working days", "5 weeks", "-1w", "5 days", "0w"])
def test_unreadable_period_is_refused_with_a_sentence(text: str) -> None:
    with pytest.raises(ValueError, match=r"period"):
        Period.parse(text)


@pytest.mark.parametrize(("kind", "count"), [("calendar", 5), ("working", 0), ("natural", True)])
def test_period_refuses_unknown_kinds_and_empty_counts(kind: str, count: int) -> None:
    with pytest.raises(ValueError, match="period"):
        Period(kind, count)  # type: ignore[arg-type]


@PROPERTY_SETTINGS
@given(periods)
def test_period_text_round_trips(period: Period) -> None:
    assert Period.parse(str(period)) == period


# --- Properties of deadlines ---------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(aware_starts, periods)
def test_deadline_is_strictly_after_start_and_in_shanghai(start: datetime, period: Period) -> None:
    due = CALENDAR.deadline(start, period)
    assert due > start
    assert due.tzinfo == SHANGHAI


@PROPERTY_SETTINGS
@given(aware_starts, working_counts, st.none() | st.just(OFFICE_CLOSE))
def test_r4_2_working_deadline_falls_on_the_nth_working_day(start: datetime, count: int, at: time | None) -> None:
    due = CALENDAR.deadline(start, Period("working", count), at=at)
    start_day = start.astimezone(SHANGHAI).date()
    assert chinese_calendar.is_workday(due.date())
    assert library_working_days(start_day, due.date()) == count
    assert CALENDAR.working_days_between(start_day, due.date()) == count
    assert due.time() == (at or start.astimezone(SHANGHAI).time())


@PROPERTY_SETTINGS
@given(aware_starts, working_counts)
def test_r3_4_natural_deadline_is_start_plus_n_days(start: datetime, count: int) -> None:
    """Same wall-clock time in Shanghai, which keeps no daylight saving: n whole days later."""
    due = CALENDAR.deadline(start, Period("natural", count), at=OFFICE_CLOSE)
    assert due == start.astimezone(SHANGHAI) + timedelta(days=count)
    assert due - start == timedelta(days=count)


@PROPERTY_SETTINGS
@given(aware_starts, aware_starts, working_counts)
def test_deadline_is_monotone_in_start(first: datetime, second: datetime, count: int) -> None:
    """With a fixed closing time the deadline never moves back; without one, its day never does.

    (Without ``at``, Saturday 23:00 is due Monday 23:00 but Sunday 09:00 Monday 09:00.)
    """
    earlier, later = sorted([first, second])
    working = Period("working", count)
    assert CALENDAR.deadline(earlier, working, OFFICE_CLOSE) <= CALENDAR.deadline(later, working, OFFICE_CLOSE)
    assert CALENDAR.deadline(earlier, working).date() <= CALENDAR.deadline(later, working).date()
    natural = Period("natural", count)
    assert CALENDAR.deadline(earlier, natural) <= CALENDAR.deadline(later, natural)


@PROPERTY_SETTINGS
@given(aware_starts, st.sampled_from(get_args(PeriodKind)), working_counts, working_counts)
def test_deadline_grows_with_the_period(start: datetime, kind: PeriodKind, first: int, second: int) -> None:
    shorter, longer = sorted([first, second])
    assert CALENDAR.deadline(start, Period(kind, shorter)) <= CALENDAR.deadline(start, Period(kind, longer))


@PROPERTY_SETTINGS
@given(known_days, st.integers(0, 15), st.integers(0, 15))
def test_working_days_after_composes(day: date, first: int, second: int) -> None:
    """R4.2's extension (5 then up to 10 more) ends where one longer count would."""
    in_two_steps = CALENDAR.working_days_after(CALENDAR.working_days_after(day, first), second)
    assert in_two_steps == CALENDAR.working_days_after(day, first + second)


# --- Override file: years the library does not know yet, and corrections --------------------------


def test_r4_2_year_unknown_to_library_and_file_is_refused_with_advice() -> None:
    with pytest.raises(CalendarUnknownError, match=r"2027.*override_file"):
        CALENDAR.is_working_day(date(2027, 1, 4))
    with pytest.raises(CalendarUnknownError, match="2027"):
        CALENDAR.deadline(shanghai("2026-12-30T10:00"), Period("working", 5))
    with pytest.raises(CalendarUnknownError, match="2003"):
        CALENDAR.is_working_day(date(2003, 12, 31))


def test_r4_2_override_file_makes_an_unknown_year_known(tmp_path: Path) -> None:
    override_file = tmp_path / "calendar.toml"
    override_file.write_text(OVERRIDE_2027_TOML, encoding="utf-8")
    calendar = WorkingDayCalendar.from_override_file(override_file)

    assert not calendar.is_working_day(date(2027, 1, 1))  # listed holiday, a Friday
    assert calendar.is_working_day(date(2027, 1, 4))  # plain Monday
    assert not calendar.is_working_day(date(2027, 1, 9))  # plain Saturday
    assert calendar.is_working_day(date(2027, 2, 6))  # make-up Saturday, string form
    assert calendar.is_working_day(date(2027, 2, 20))  # make-up Saturday, TOML date form
    # Thu 31 Dec 2026 + 1 working day crosses into 2027: Fri 1 Jan rests, Mon 4 Jan works.
    due = calendar.deadline(shanghai("2026-12-31T10:00"), Period("working", 1))
    assert due == shanghai("2027-01-04T10:00")
    with pytest.raises(CalendarUnknownError, match="2028"):
        calendar.is_working_day(date(2028, 1, 3))


def test_without_an_override_file_the_calendar_is_the_library() -> None:
    calendar = WorkingDayCalendar.from_override_file(None)
    assert calendar.is_working_day(date(2026, 2, 14))
    with pytest.raises(CalendarUnknownError):
        calendar.is_working_day(date(2027, 1, 4))


def test_override_restating_the_library_for_2026_agrees_with_it() -> None:
    calendar = WorkingDayCalendar.from_override_text(LIBRARY_2026_TOML)
    year_2026 = days("2026-01-01", "2026-12-31")
    assert [calendar.is_working_day(day) for day in year_2026] == [
        chinese_calendar.is_workday(day) for day in year_2026
    ]


def test_override_alone_describes_a_year_as_the_notice_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As with a library release that predates the notice, the file alone decides the year."""
    library_is_workday = chinese_calendar.is_workday
    year_2026 = days("2026-01-01", "2026-12-31")
    expected = [library_is_workday(day) for day in year_2026]

    def library_without_2026(day: date) -> bool:
        if day.year == 2026:
            raise NotImplementedError("no available data for year 2026")
        return library_is_workday(day)

    monkeypatch.setattr(chinese_calendar, "is_workday", library_without_2026)
    with pytest.raises(CalendarUnknownError, match="2026"):
        CALENDAR.is_working_day(date(2026, 3, 10))
    calendar = WorkingDayCalendar.from_override_text(LIBRARY_2026_TOML)
    assert [calendar.is_working_day(day) for day in year_2026] == expected


def test_override_corrects_only_the_dates_it_lists_in_a_known_year() -> None:
    calendar = WorkingDayCalendar.from_override_text('[2026]\nholidays = ["2026-12-31"]\n')
    assert not calendar.is_working_day(date(2026, 12, 31))
    assert not calendar.is_working_day(date(2026, 2, 16))  # the library's Spring Festival stays
    assert calendar.is_working_day(date(2026, 2, 14))


def test_overrides_can_be_given_directly() -> None:
    calendar = WorkingDayCalendar({date(2027, 1, 1): False}, extra_years=[2027])
    assert not calendar.is_working_day(date(2027, 1, 1))
    assert calendar.is_working_day(date(2027, 1, 4))


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('[2027]\nholidays = ["2027-02-30"]\n', ["[2027] holidays", "'2027-02-30'", "YYYY-MM-DD"]),
        ('[2027]\nholidays = ["1/2/2027"]\n', ["[2027] holidays", "'1/2/2027'"]),
        ("[2027]\nworkdays = [20270220]\n", ["[2027] workdays", "20270220"]),
        ("[2027]\nworkdays = [2027-02-20T09:00:00]\n", ["[2027] workdays", "is not a date"]),
        ('[2027]\nholidays = ["2028-01-01"]\n', ["[2027] holidays", "'2028-01-01'", "outside"]),
        (
            '[2027]\nholidays = ["2027-02-20"]\nworkdays = ["2027-02-20"]\n',
            ["[2027] workdays", "'2027-02-20'", "listed twice"],
        ),
        ('[2027]\nholidays = ["2027-01-01", "2027-01-01"]\n', ["[2027] holidays", "twice"]),
        ('[2027]\nholiday = ["2027-01-01"]\n', ["[2027] holiday", "unknown key"]),
        ('[2027]\nholidays = "2027-01-01"\n', ["[2027] holidays", "not a list"]),
        ('[calendar]\nholidays = ["2027-01-01"]\n', ["[calendar]", "not a year table"]),
        ("2027 = 5\n", ["[2027]", "not a year table"]),
        ("[2027\n", ["not valid TOML"]),
    ],
)
def test_malformed_override_file_names_file_key_and_fault(text: str, named: list[str]) -> None:
    with pytest.raises(CalendarOverrideError) as refused:
        WorkingDayCalendar.from_override_text(text, source="/etc/gateway/calendar.toml")
    message = str(refused.value)
    assert "/etc/gateway/calendar.toml" in message
    for part in named:
        assert part in message


def test_missing_override_file_is_refused_with_its_name(tmp_path: Path) -> None:
    missing = tmp_path / "calendar.toml"
    with pytest.raises(CalendarOverrideError, match=r"calendar\.toml.*override_file"):
        WorkingDayCalendar.from_override_file(missing)
