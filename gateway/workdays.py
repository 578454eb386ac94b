"""The working-day calendar: deadlines counted on the Chinese official calendar.

SPEC R3.4 (default rating after 5 working days, or 7 natural days) and R4.2 (bad-rating deadlines
of 1, 5, 10 and 15 working days) count days the way the State Council's yearly notice sets them:
weekdays work and weekends rest, except the announced holidays and make-up workdays.
The ``chinese_calendar`` library carries those notices up to its release; an override file
supplies later years (or corrections), so the gateway never guesses a year it does not know.

Pure code: the only I/O is :meth:`WorkingDayCalendar.from_override_file`, and the current time is
always passed in.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Any, Literal, get_args
from zoneinfo import ZoneInfo

import chinese_calendar

SHANGHAI = ZoneInfo("Asia/Shanghai")

PeriodKind = Literal["working", "natural"]

_ONE_DAY = timedelta(days=1)
_PERIOD_TEXT = re.compile(r"(?P<count>\d+)\s*(?:(?P<kind>working|natural)\s+days?|(?P<short>[wd]))", re.IGNORECASE)
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_YEAR = re.compile(r"\d{4}")
_WORKING_BY_LIST = {"holidays": False, "workdays": True}


class CalendarUnknownError(ValueError):
    """A date in a year that neither ``chinese_calendar`` nor the override file describes.

    Raised rather than guessed: a guessed holiday would move a SPEC R3.4/R4.2 deadline.
    """


class CalendarOverrideError(ValueError):
    """A malformed calendar override file; the message names the file, the key and the fault."""


@dataclass(frozen=True)
class Period:
    """A configurable length of time: ``Period("working", 5)`` or ``Period("natural", 7)``.

    SPEC R3.4 lets a deployment choose either kind (Gansu: 5 working days, Guangdong: 7 natural
    days); SPEC R4.2 counts working days.
    """

    kind: PeriodKind
    count: int

    def __post_init__(self) -> None:
        if self.kind not in get_args(PeriodKind):
            raise ValueError(f"A period is counted in 'working' or 'natural' days, not {self.kind!r}.")
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"A period is a whole number of days from 1 up, not {self.count!r}.")

    @classmethod
    def parse(cls, text: str) -> Period:
        """Read a period from configuration: "5 working days", "7 natural days", "5w" or "7d"."""
        match = _PERIOD_TEXT.fullmatch(text.strip())
        if match is None:
            raise ValueError(
                f"Cannot read {text!r} as a period: write it as '5 working days' or "
                "'7 natural days' (short forms '5w' and '7d')."
            )
        short = (match["short"] or "").lower()
        kind = (match["kind"] or "").lower() or ("working" if short == "w" else "natural")
        return cls(kind, int(match["count"]))  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"{self.count} {self.kind} day{'' if self.count == 1 else 's'}"


class WorkingDayCalendar:
    """Which days are working days in mainland China, and the deadlines they give.

    A day is decided by, in order: the overrides (date -> working?), then ``chinese_calendar``,
    then, for a year in ``extra_years``, the plain rule (Monday to Friday work). Any other day is
    a :class:`CalendarUnknownError`. For a year the library knows, overrides correct only the
    dates they list.
    """

    def __init__(self, overrides: Mapping[date, bool] | None = None, extra_years: Iterable[int] = ()) -> None:
        self._overrides: dict[date, bool] = {}
        for day, working in (overrides or {}).items():
            _require_plain_date(day)
            self._overrides[day] = bool(working)
        self._extra_years = frozenset(extra_years)

    @classmethod
    def from_override_file(cls, path: str | os.PathLike[str] | None) -> WorkingDayCalendar:
        """Load the file named by ``[calendar] override_file``; None means the library alone."""
        if path is None:
            return cls()
        source = os.fspath(path)
        try:
            with open(source, "rb") as override_file:
                text = override_file.read().decode("utf-8")
        except OSError as error:
            raise CalendarOverrideError(
                f"Calendar override file {source} cannot be read ({error.strerror or error}); "
                "fix [calendar] override_file in the gateway config."
            ) from error
        except UnicodeDecodeError as error:
            raise CalendarOverrideError(
                f"Calendar override file {source} is not UTF-8 text ({error.reason})."
            ) from error
        return cls.from_override_text(text, source=source)

    @classmethod
    def from_override_text(cls, text: str, source: str = "<override>") -> WorkingDayCalendar:
        """Build a calendar from override TOML: one ``[YYYY]`` table per year it describes.

        A table makes its year known (weekdays work, weekends rest) except for the dates in its
        ``holidays`` (rest) and ``workdays`` (make-up working days, 调休上班) lists.
        """
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise CalendarOverrideError(f"Calendar override file {source} is not valid TOML: {error}.") from error
        overrides, years = _read_override_document(document, source)
        return cls(overrides, extra_years=years)

    def is_working_day(self, day: date) -> bool:
        """Whether ``day`` (a date in Asia/Shanghai) is an official working day."""
        _require_plain_date(day)
        override = self._overrides.get(day)
        if override is not None:
            return override
        try:
            return chinese_calendar.is_workday(day)
        except NotImplementedError as library_gap:
            if day.year in self._extra_years:
                return day.weekday() < 5
            raise CalendarUnknownError(
                f"The working-day calendar does not know the year {day.year} (needed for "
                f"{day.isoformat()}): chinese_calendar says {library_gap}. The deployment must "
                f"supply the official schedule for {day.year} in an override file "
                "([calendar] override_file in the gateway config)."
            ) from library_gap

    def working_days_after(self, day: date, count: int) -> date:
        """The ``count``-th working day strictly after ``day``; ``day`` itself when count is 0.

        The starting day is never counted, as for any period counted in days (Civil Code art. 201).
        """
        if count < 0:
            raise ValueError(f"Cannot count {count} working days: the count must be 0 or more.")
        current = day
        remaining = count
        while remaining:
            current += _ONE_DAY
            if self.is_working_day(current):
                remaining -= 1
        return current

    def working_days_between(self, start: date, end: date) -> int:
        """How many working days lie in (start, end]: 0 when end is not after start."""
        count = 0
        current = start
        while current < end:
            current += _ONE_DAY
            count += self.is_working_day(current)
        return count

    def deadline(self, start: datetime, period: Period, at: time | None = None) -> datetime:
        """When a period that begins at ``start`` ends (SPEC R3.4 default rating, R4.2 cases).

        ``start`` must be timezone-aware; days are counted in Asia/Shanghai, and the result is
        an aware datetime there.

        - ``Period("natural", n)``: start + n days, at the same wall-clock time. ``at`` is not
          used: a natural period is a span of days, needing no calendar and no override file.
        - ``Period("working", n)``: the n-th working day strictly after the start's date, at the
          start's wall-clock time, or at ``at`` (a naive Shanghai time, e.g. 17:30 office close).
          Work completed on a Saturday at 23:00 is therefore due on the next working day at 23:00.
        """
        local_start = _in_shanghai(start, "start")
        if period.kind == "natural":
            return local_start + timedelta(days=period.count)
        if at is not None and at.tzinfo is not None:
            raise ValueError(
                f"The deadline time {at.isoformat()} must be a plain wall-clock time in "
                "Asia/Shanghai, without a timezone (for example time(17, 30))."
            )
        due_day = self.working_days_after(local_start.date(), period.count)
        return datetime.combine(due_day, at if at is not None else local_start.time(), tzinfo=SHANGHAI)

    def is_within(self, start: datetime, period: Period, moment: datetime, at: time | None = None) -> bool:
        """Whether ``moment`` comes before the deadline of ``period`` begun at ``start``."""
        return _in_shanghai(moment, "moment") < self.deadline(start, period, at)


def _require_plain_date(day: object) -> None:
    if isinstance(day, datetime) or not isinstance(day, date):
        raise TypeError(
            f"The working-day calendar takes dates, not {day!r}: pass the day in "
            "Asia/Shanghai, e.g. moment.astimezone(SHANGHAI).date()."
        )


def _in_shanghai(moment: datetime, name: str) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(
            f"The {name} time {moment.isoformat()} has no timezone: pass an aware datetime "
            "(for example datetime.now(SHANGHAI)) so that days are counted in Asia/Shanghai."
        )
    return moment.astimezone(SHANGHAI)


def _read_override_document(document: Mapping[str, Any], source: str) -> tuple[dict[date, bool], set[int]]:
    overrides: dict[date, bool] = {}
    years: set[int] = set()
    for year_key, table in document.items():
        if not _YEAR.fullmatch(year_key) or not isinstance(table, dict):
            raise CalendarOverrideError(
                f"Calendar override file {source}: [{year_key}] is not a year table; name each "
                "table after the year it describes, e.g. [2027]."
            )
        year = int(year_key)
        years.add(year)
        for list_key, entries in table.items():
            where = f"Calendar override file {source}: in [{year_key}] {list_key}"
            if list_key not in _WORKING_BY_LIST:
                raise CalendarOverrideError(f"{where}: unknown key; a year table holds only 'holidays' and 'workdays'.")
            if not isinstance(entries, list):
                raise CalendarOverrideError(f'{where}: {entries!r} is not a list of dates like ["{year}-01-01"].')
            for entry in entries:
                day = _read_override_date(entry, where)
                if day.year != year:
                    raise CalendarOverrideError(
                        f"{where}: {entry!r} lies outside {year}; move it to its own year table."
                    )
                if day in overrides:
                    raise CalendarOverrideError(f"{where}: {entry!r} is listed twice; keep it in one list, once.")
                overrides[day] = _WORKING_BY_LIST[list_key]
    return overrides, years


def _read_override_date(entry: object, where: str) -> date:
    if isinstance(entry, date) and not isinstance(entry, datetime):
        return entry
    if isinstance(entry, str) and _ISO_DATE.fullmatch(entry):
        try:
            return date.fromisoformat(entry)
        except ValueError:
            pass
    raise CalendarOverrideError(f'{where}: {entry!r} is not a date; write dates as "YYYY-MM-DD".')
