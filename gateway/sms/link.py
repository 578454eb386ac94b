"""The decisions of an SMPP link that are worth owning: pace, window, throttling, reconnects.

Pure code, no sockets and no clock: every method takes ``now`` (seconds on a monotonic clock),
so the adapter in :mod:`gateway.sms.smpp` calls them from its I/O thread and the tests call them
with a simulated clock (STYLE.md, h11).

- :class:`Pacer` holds the configured rate precisely: the k-th submit goes at ``t0 + k/rate``
  (generic cell rate algorithm), with only a small burst allowance after idle. An SMSC that
  answers ``ESME_RTHROTTLED`` or ``ESME_RMSGQFUL`` makes it pause and halve its pace once per
  episode, then recover linearly to the configured rate: slow down, never drop (issue 4).
- :class:`Window` keeps the outstanding ``submit_sm`` by sequence number with their deadlines,
  since smpplib does not know which submits went unanswered after a dropped link (LIBRARIES.md).
- :class:`Backoff` spaces reconnects: capped exponential, with jitter so that several gateway
  instances do not reconnect in step, and reset only by a link that stayed bound for a while.

The bytes themselves are read and written by :mod:`gateway.sms.pdu`.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

#: Statuses that mean "the SMSC is busy, send this again later" (SMPP 3.4 section 5.1.3).
ESME_RMSGQFUL = 0x14
ESME_RTHROTTLED = 0x58
THROTTLING_STATUSES = frozenset({ESME_RMSGQFUL, ESME_RTHROTTLED})

#: Error statuses that say this message can never be taken as it is (SPEC R3.7: failed at once):
#: its destination, its length, its parameters. Every other status is worth a later attempt
#: (bounded): the SMSC's own trouble, the link's, the gateway's settings (a source address or
#: service type not provisioned yet, which the operator can fix), or a vendor's code.
PERMANENT_STATUSES = frozenset(
    {
        0x01,  # ESME_RINVMSGLEN
        0x0B,  # ESME_RINVDSTADR
        0x33,  # ESME_RINVNUMDESTS
        0x40,  # ESME_RINVDESTFLAG
        0x43,  # ESME_RINVESMCLASS
        0x50,  # ESME_RINVDSTTON
        0x51,  # ESME_RINVDSTNPI
        0x61,  # ESME_RINVSCHED
        0x62,  # ESME_RINVEXPIRY
        0x65,  # ESME_RX_P_APPN: the recipient refuses it for good
        0xC0,  # ESME_RINVOPTPARSTREAM
        0xC1,  # ESME_ROPTPARNOTALLWD
        0xC2,  # ESME_RINVPARLEN
        0xC3,  # ESME_RMISSINGOPTPARAM
        0xC4,  # ESME_RINVOPTPARAMVAL
    }
)


def is_permanent(status: int) -> bool:
    """Whether sending the same submit_sm again is pointless (invalid address, bad parameters …)."""
    return status in PERMANENT_STATUSES


# ---------------------------------------------------------------------------------------------
# Pace
# ---------------------------------------------------------------------------------------------


class Pacer:
    """Spaces submits at ``rate`` per second and slows down when the SMSC throttles.

    Virtual scheduling (GCRA): ``_due`` is when the next submit is due; one may go at
    ``_due - tolerance``, and each submit moves ``_due`` on by one interval from where it was,
    not from when the submit actually went. A loop that wakes a little late therefore catches
    up, and over a minute the count is ``rate * 60`` plus at most the burst. After idle, ``_due``
    restarts from now, so the burst allowance is ``1 + tolerance * rate`` submits, where
    ``tolerance`` is ``burst_seconds`` (default 50 ms: enough to absorb a thread's wake-up jitter).

    Throttling (:meth:`throttled`): sending pauses for ``throttle_delay`` (doubling for each
    episode that comes before full recovery, up to ``throttle_max_delay``) and the pace halves
    (not below ``min_rate``); once per episode, as all submits already in flight when the SMSC
    started throttling come back throttled together. After the pause the pace climbs back
    linearly to ``rate`` over ``recovery`` seconds.
    """

    def __init__(
        self,
        rate: float,
        *,
        burst_seconds: float = 0.05,
        throttle_delay: float = 1.0,
        throttle_max_delay: float = 30.0,
        recovery: float = 30.0,
        min_rate: float | None = None,
    ) -> None:
        if rate <= 0:
            raise ValueError(f"The rate must be greater than 0 messages/s, not {rate}.")
        self.rate = float(rate)
        self.tolerance = max(0.0, burst_seconds)
        self.throttle_delay = throttle_delay
        self.throttle_max_delay = max(throttle_max_delay, throttle_delay)
        self.recovery = max(recovery, 0.0)
        self.min_rate = min(self.rate, min_rate if min_rate is not None else max(self.rate / 64, 0.1))
        self._due: float | None = None
        self._paused_until = -math.inf
        self._low = self.rate  # the pace right after the last decrease
        self._decreased_at = -math.inf
        self._episodes = 0  # throttling episodes since the pace was last fully recovered

    # -- reading ---------------------------------------------------------------------------------

    def pace(self, now: float) -> float:
        """The current pace in messages/s: ``rate``, or less while recovering from throttling.

        Only reads (another thread may show it in a status page).
        """
        if self._low >= self.rate:
            return self.rate
        start = max(self._paused_until, self._decreased_at)
        if now <= start:
            return self._low
        if self.recovery <= 0 or now - start >= self.recovery:
            return self.rate
        return self._low + (self.rate - self._low) * (now - start) / self.recovery

    def next_send_at(self, now: float) -> float:
        """The earliest time the next submit may go (``<= now`` means now)."""
        at = now if self._due is None else self._due - self.tolerance
        return max(at, self._paused_until)

    def ready(self, now: float) -> bool:
        return self.next_send_at(now) <= now

    @property
    def paused_until(self) -> float:
        return self._paused_until

    # -- events ----------------------------------------------------------------------------------

    def sent(self, now: float) -> None:
        """One submit went at ``now``."""
        interval = 1.0 / self.pace(now)
        # After idle, start again from now: at most the burst allowance goes at once.
        self._due = (now if self._due is None else max(self._due, now)) + interval

    def throttled(self, now: float, sent_at: float) -> float:
        """The SMSC throttled a submit sent at ``sent_at``; return when sending may go on."""
        if sent_at >= self._decreased_at:
            current = self.pace(now)
            if current >= self.rate:
                self._episodes = 0  # fully recovered since the last episode: start from the shortest pause
            self._episodes += 1
            delay = min(self.throttle_delay * 2 ** (self._episodes - 1), self.throttle_max_delay)
            self._low = max(self.min_rate, current / 2)
            self._decreased_at = now
            self._paused_until = max(self._paused_until, now + delay)
            self._due = None
        return self._paused_until


# ---------------------------------------------------------------------------------------------
# Window
# ---------------------------------------------------------------------------------------------


@dataclass
class Outstanding(Generic[T]):
    """One request written to the SMSC and not answered yet."""

    sequence: int
    item: T
    sent_at: float
    deadline: float


class Window(Generic[T]):
    """The outstanding requests of one link, by sequence number, at most ``size`` of them.

    Deadlines are kept in sending order (one timeout for all), so :meth:`expired` looks only at
    the oldest entries.
    """

    def __init__(self, size: int, timeout: float) -> None:
        if size < 1:
            raise ValueError(f"A window holds at least 1 request, not {size}.")
        self.size = size
        self.timeout = timeout
        self._open: dict[int, Outstanding[T]] = {}
        self._order: deque[Outstanding[T]] = deque()

    def __len__(self) -> int:
        return len(self._open)

    def __contains__(self, sequence: int) -> bool:
        return sequence in self._open

    def __iter__(self) -> Iterator[Outstanding[T]]:
        return iter(list(self._open.values()))

    @property
    def has_room(self) -> bool:
        return len(self._open) < self.size

    def open(self, sequence: int, item: T, now: float) -> Outstanding[T]:
        if sequence in self._open:
            raise ValueError(f"Sequence number {sequence} is already outstanding.")
        entry = Outstanding(sequence, item, now, now + self.timeout)
        self._open[sequence] = entry
        self._order.append(entry)
        return entry

    def close(self, sequence: int) -> Outstanding[T] | None:
        """The request answered by ``sequence``, or None for an answer to nothing outstanding."""
        return self._open.pop(sequence, None)

    def next_deadline(self) -> float | None:
        self._trim()
        return self._order[0].deadline if self._order else None

    def expired(self, now: float) -> list[Outstanding[T]]:
        """Remove and return the requests whose deadline has passed."""
        gone: list[Outstanding[T]] = []
        while self._order and self._order[0].deadline <= now:
            entry = self._order.popleft()
            if self._open.get(entry.sequence) is entry:
                del self._open[entry.sequence]
                gone.append(entry)
        return gone

    def drain(self) -> list[Outstanding[T]]:
        """Remove and return everything outstanding (the link dropped), oldest first."""
        gone = [e for e in self._order if self._open.get(e.sequence) is e]
        self._open.clear()
        self._order.clear()
        return gone

    def _trim(self) -> None:
        while self._order and self._open.get(self._order[0].sequence) is not self._order[0]:
            self._order.popleft()


# ---------------------------------------------------------------------------------------------
# Reconnects
# ---------------------------------------------------------------------------------------------


class Backoff:
    """Delays between reconnect attempts: ``min_delay``, doubling, capped at ``max_delay``.

    Each delay is drawn between half and all of its step (jitter), so it never exceeds
    ``max_delay`` and never falls below ``min_delay / 2``.

    A successful bind alone does not reset the delays: an SMSC that accepts the bind and then
    drops the link at once (a flapping peer, a full SMSC that unbinds right after the bind, a
    firewall cutting the connection) would otherwise be reconnected at the minimum delay forever.
    The adapter reports :meth:`bound` and :meth:`dropped`; only a link that stayed bound for
    ``stable_after`` seconds brings the next delay back to ``min_delay``, and one that drops
    sooner keeps the delays growing up to the cap. ``stable_after`` defaults to ``max_delay``:
    however a peer flaps, the link is then never reconnected much more often than once per
    ``max_delay``, the pace the cap allows for a peer that is down. The check is made when the
    link drops, so no timer is needed.
    """

    def __init__(
        self,
        min_delay: float,
        max_delay: float,
        rng: random.Random | None = None,
        *,
        stable_after: float | None = None,
    ) -> None:
        if min_delay <= 0 or max_delay < min_delay:
            raise ValueError(f"Reconnect delays need 0 < min ({min_delay}) <= max ({max_delay}).")
        self.min_delay = min_delay
        self.max_delay = max_delay
        self.stable_after = max_delay if stable_after is None else max(0.0, stable_after)
        self.attempts = 0
        self._rng = rng or random.Random()
        self._bound_at: float | None = None

    def step(self) -> float:
        """The delay before the next attempt without jitter."""
        return min(self.max_delay, self.min_delay * 2.0 ** min(self.attempts, 60))

    def next_delay(self) -> float:
        step = self.step()
        self.attempts += 1
        return step * (0.5 + 0.5 * self._rng.random())

    def reset(self) -> None:
        self.attempts = 0

    def bound(self, now: float) -> None:
        """The link is bound (every connection of it) at ``now``."""
        self._bound_at = now

    def dropped(self, now: float) -> float:
        """The link dropped, or a connect or bind failed, at ``now``: the delay before the next attempt.

        Back to ``min_delay`` if the link had stayed bound for ``stable_after`` seconds; otherwise
        one step longer than the last delay (up to ``max_delay``).
        """
        bound_at, self._bound_at = self._bound_at, None
        if bound_at is not None and now - bound_at >= self.stable_after:
            self.reset()
        return self.next_delay()
