"""When to send an invitation or the reminder, and when to record the default rating (SPEC R3.1-R3.4).

:func:`next_action` is a pure function of one invitation's state and ``now``: the store-side
scheduler asks it what comes next for a service record and when, does it (or sleeps until then),
writes the new state and asks again. The flow for one completed service record::

    completed ─(invite_delay)─► SendInvitation ─(24 h)─► SendReminder ─► RecordDefaultRating
        │                           │                       │               (at closes_at)
        └── rated at any point: Done; opted out: no more sends, the default is still recorded

Every send is moved out of the quiet hours (SPEC R3.2, Asia/Shanghai) and behind the per-number
caps (SPEC R3.10): it is deferred, never dropped, except that a send that could only go out
after the rating window closes is pointless and is not made. The default rating is recorded
at the window's end whatever happened before (SPEC R3.4).

Pure code: no clock, no store; ``now`` and the sends already made are arguments.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from typing import TYPE_CHECKING

from gateway.rating import DEFAULT_LEVEL, Level
from gateway.workdays import SHANGHAI, Period, WorkingDayCalendar

if TYPE_CHECKING:
    from gateway.config import SmsConfig


def closes_at(completed_at: datetime, period: Period, calendar: WorkingDayCalendar) -> datetime:
    """The end of the rating window: ``period`` after completion (SPEC R3.4).

    5 working days (Gansu) counts on the official calendar with its holidays and make-up
    workdays, at the wall-clock time of completion; 7 natural days (Guangdong) is 7 × 24 h.
    The store computes this once, when the record is completed, and keeps it.
    """
    return calendar.deadline(completed_at, period)


# ---------------------------------------------------------------------------------------------
# Quiet hours (SPEC R3.2)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuietHours:
    """A daily span with no sends, in Asia/Shanghai wall-clock time: ``start`` included, ``end`` not.

    ``QuietHours(time(21), time(8))`` crosses midnight: 20:59 may send, 21:00 and 07:59 may not,
    08:00 may. A span that does not cross midnight (``12:00-14:00``) works the same way; equal
    start and end mean no quiet hours at all.
    """

    start: time
    end: time

    def __post_init__(self) -> None:
        if self.start.tzinfo is not None or self.end.tzinfo is not None:
            raise ValueError("Quiet hours are plain wall-clock times in Asia/Shanghai, without a timezone.")

    @classmethod
    def from_config(cls, value: tuple[time, time] | None) -> QuietHours | None:
        """From ``[sms] quiet_hours`` as :func:`gateway.config.parse_quiet_hours` reads it."""
        return None if value is None else cls(*value)

    def contains(self, moment: datetime) -> bool:
        clock = _in_shanghai(moment).time()
        if self.start == self.end:
            return False
        if self.start < self.end:
            return self.start <= clock < self.end
        return clock >= self.start or clock < self.end

    def next_allowed(self, moment: datetime) -> datetime:
        """``moment`` itself outside the quiet hours, else the end of the quiet span it lies in."""
        local = _in_shanghai(moment)
        if not self.contains(local):
            return local
        day = local.date()
        if self.start > self.end and local.time() >= self.start:
            day += timedelta(days=1)
        return datetime.combine(day, self.end, tzinfo=SHANGHAI)


# ---------------------------------------------------------------------------------------------
# Per-number caps (SPEC R3.10)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cap:
    """At most ``limit`` messages in any ``window`` (a sliding window), optionally of one content."""

    limit: int
    window: timedelta
    same_content: bool = False

    def __post_init__(self) -> None:
        if self.limit < 1 or self.window <= timedelta(0):
            raise ValueError(f"A cap needs a limit of at least 1 and a positive window, not {self}.")


@dataclass(frozen=True)
class SentMessage:
    """A message already submitted to one number under one signature: when, and its text."""

    at: datetime
    content: str | None = None


#: Typical carrier rules: the same content once a day; 3 a minute, 10 an hour, 50 a day.
CARRIER_CAPS: tuple[Cap, ...] = (
    Cap(1, timedelta(days=1), same_content=True),
    Cap(3, timedelta(minutes=1)),
    Cap(10, timedelta(hours=1)),
    Cap(50, timedelta(days=1)),
)


@dataclass(frozen=True)
class RateCaps:
    """The gateway's own per-number, per-signature caps, so the carrier never refuses (SPEC R3.10).

    Windows slide: "50 a day" means no 24 hours with more than 50, which also keeps any
    calendar day within 50, whichever way a carrier counts. The caller passes the messages
    already sent to one number under one signature (the last day is enough for the defaults).
    """

    caps: tuple[Cap, ...] = CARRIER_CAPS

    @property
    def longest_window(self) -> timedelta:
        """How far back the history passed to :meth:`earliest` must reach."""
        return max((cap.window for cap in self.caps), default=timedelta(0))

    def earliest(self, sent: Iterable[SentMessage], now: datetime, content: str | None = None) -> datetime:
        """The earliest moment from ``now`` at which one more message (of ``content``) may go."""
        history = list(sent)
        moment = now
        while True:
            later = max((self._earliest_for(cap, history, moment, content) for cap in self.caps), default=moment)
            if later <= moment:
                return moment
            moment = later

    @staticmethod
    def _earliest_for(cap: Cap, history: Sequence[SentMessage], now: datetime, content: str | None) -> datetime:
        if cap.same_content and content is None:
            return now
        times = sorted(
            sent.at
            for sent in history
            if sent.at > now - cap.window and (not cap.same_content or sent.content == content)
        )
        if len(times) < cap.limit:
            return now
        # Wait until enough of them have left the window to leave room for one more.
        return max(now, times[len(times) - cap.limit] + cap.window)


# ---------------------------------------------------------------------------------------------
# The schedule (SPEC R3.1-R3.4, R3.8)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScheduleSettings:
    """The ``[sms]`` timings and the caps, as typed values."""

    invite_delay: timedelta = timedelta(seconds=60)
    quiet_hours: QuietHours | None = field(default_factory=lambda: QuietHours(time(21), time(8)))
    reminder_after: timedelta = timedelta(hours=24)
    default_rating_after: Period = field(default_factory=lambda: Period("working", 5))
    caps: RateCaps = field(default_factory=RateCaps)

    @classmethod
    def from_config(cls, sms: SmsConfig, caps: RateCaps | None = None) -> ScheduleSettings:
        return cls(
            invite_delay=timedelta(seconds=sms.invite_delay),
            quiet_hours=QuietHours.from_config(sms.quiet_hours),
            reminder_after=timedelta(seconds=sms.reminder_after),
            default_rating_after=sms.default_rating_after,
            caps=caps or RateCaps(),
        )

    def closes_at(self, completed_at: datetime, calendar: WorkingDayCalendar) -> datetime:
        """The rating window's end for a record completed at ``completed_at`` (see :func:`closes_at`)."""
        return closes_at(completed_at, self.default_rating_after, calendar)


@dataclass(frozen=True)
class InvitationState:
    """One service record's SMS invitation (邀评短信) as the store holds it.

    ``rated`` is true once any rating is recorded for the record (a reply, another channel,
    or the default); ``opted_out`` once the number has opted out (SPEC R3.8).
    """

    completed_at: datetime
    closes_at: datetime
    sent_at: datetime | None = None
    reminded_at: datetime | None = None
    rated: bool = False
    opted_out: bool = False


@dataclass(frozen=True)
class SendInvitation:
    at: datetime


@dataclass(frozen=True)
class SendReminder:
    at: datetime


@dataclass(frozen=True)
class RecordDefaultRating:
    """Record the default rating (默认评价) stamped ``at`` the window's end (SPEC R3.4)."""

    at: datetime
    level: Level = DEFAULT_LEVEL


@dataclass(frozen=True)
class Done:
    """The record is rated: nothing more to send or record."""


NextAction = SendInvitation | SendReminder | RecordDefaultRating | Done


def next_action(
    state: InvitationState,
    now: datetime,
    settings: ScheduleSettings | None = None,
    sent: Iterable[SentMessage] = (),
    content: str | None = None,
) -> NextAction:
    """What comes next for ``state`` and when: act when ``at <= now``, else wake at ``at``.

    - Rated: :class:`Done`.
    - Not invited: the invitation, ``invite_delay`` after completion (SPEC R3.1).
    - Invited, not reminded: the one reminder (SPEC R3.3), 24 h after completion, or after the
      invitation when that went out later (quiet hours, caps, a backlog), so a reminder never
      follows its invitation within hours.
    - Otherwise, or opted out (SPEC R3.8), or when a send could only go out after the window
      closes: the default rating at ``closes_at`` (SPEC R3.4); its ``at`` may be past, meaning now.

    A send's ``at`` is never before ``now``, lies outside the quiet hours and respects the caps
    given the messages already ``sent`` to the number (``content``: the text about to go, for
    the same-content cap), so a scheduler that was down sends in the morning, not at night.
    """
    settings = settings or ScheduleSettings()
    if state.rated:
        return Done()
    if not state.opted_out and state.sent_at is None:
        at = send_time(state.completed_at + settings.invite_delay, now, settings, sent, content)
        if at < state.closes_at:
            return SendInvitation(at)
    elif not state.opted_out and state.sent_at is not None and state.reminded_at is None:
        earliest = max(state.completed_at, state.sent_at) + settings.reminder_after
        at = send_time(earliest, now, settings, sent, content)
        if at < state.closes_at:
            return SendReminder(at)
    return RecordDefaultRating(_in_shanghai(state.closes_at))


def send_time(
    earliest: datetime,
    now: datetime,
    settings: ScheduleSettings | None = None,
    sent: Iterable[SentMessage] = (),
    content: str | None = None,
) -> datetime:
    """The first moment from ``max(earliest, now)`` outside the quiet hours and within the caps.

    A cap may push a send into the quiet hours and the quiet hours may push it to where a cap
    applies again, so the two are applied in turn until neither moves it.
    """
    settings = settings or ScheduleSettings()
    history = list(sent)
    moment = _in_shanghai(max(earliest, now))
    while True:
        if settings.quiet_hours is not None:
            moment = settings.quiet_hours.next_allowed(moment)
        allowed = _in_shanghai(settings.caps.earliest(history, moment, content))
        if allowed == moment:
            return moment
        moment = allowed


def _in_shanghai(moment: datetime) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(
            f"The time {moment.isoformat()} has no timezone: pass an aware datetime "
            "(for example datetime.now(SHANGHAI)) so that quiet hours are read in Asia/Shanghai."
        )
    return moment.astimezone(SHANGHAI)
