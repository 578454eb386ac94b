"""The SMPP link's own decisions, with a simulated clock: pace, throttling, window, reconnects, framing."""

from __future__ import annotations

import random

import pytest

from gateway.sms.link import ESME_RMSGQFUL, ESME_RTHROTTLED, Backoff, Pacer, Window, is_permanent


def run_saturated(pacer: Pacer, start: float, until: float, jitter: float = 0.0, seed: int = 1) -> list[float]:
    """Like the I/O loop with an endless backlog: wake when the pacer allows (up to ``jitter`` late),
    send everything it allows at that moment, sleep again; return the send times."""
    rng = random.Random(seed)
    now = start
    times: list[float] = []
    while True:
        at = pacer.next_send_at(now)
        now = max(now, at) + rng.random() * jitter
        if now >= until:
            return times
        while pacer.ready(now):
            pacer.sent(now)
            times.append(now)


@pytest.mark.parametrize("rate", [1.0, 7.5, 50.0, 200.0, 3000.0])
def test_rate_is_held_within_2_percent_over_a_minute(rate: float) -> None:
    pacer = Pacer(rate)
    times = run_saturated(pacer, 1000.0, 1060.0, jitter=0.004)
    assert abs(len(times) - rate * 60) <= 0.02 * rate * 60
    # and in every 10-second slice, not only on average
    for slice_start in range(1000, 1060, 10):
        count = sum(1 for t in times if slice_start <= t < slice_start + 10)
        assert abs(count - rate * 10) <= max(2, 0.02 * rate * 10)


def test_kth_submit_goes_at_t0_plus_k_over_rate_despite_late_wakeups() -> None:
    pacer = Pacer(100.0, burst_seconds=0.05)
    times = run_saturated(pacer, 0.0, 10.0, jitter=0.01)
    # a loop waking up to 10 ms late never falls behind the schedule by more than that
    for k, t in enumerate(times):
        assert t <= k / 100.0 + 0.011


def test_only_a_small_burst_after_idle() -> None:
    pacer = Pacer(100.0, burst_seconds=0.05)
    run_saturated(pacer, 0.0, 5.0)
    # idle for a minute, then a backlog arrives
    now = 65.0
    at_once = 0
    while pacer.next_send_at(now) <= now:
        pacer.sent(now)
        at_once += 1
    assert at_once <= 1 + 0.05 * 100
    assert at_once >= 1


def test_throttling_pauses_then_slows_down_then_recovers_gradually() -> None:
    pacer = Pacer(100.0, throttle_delay=1.0, recovery=10.0)
    run_saturated(pacer, 0.0, 5.0)
    resume = pacer.throttled(5.0, sent_at=4.99)
    assert resume == pytest.approx(6.0)
    assert not pacer.ready(5.5)
    assert pacer.pace(6.0) == pytest.approx(50.0)
    times = run_saturated(pacer, 5.0, 20.0)
    assert min(times) >= 6.0
    during_first_second = sum(1 for t in times if 6.0 <= t < 7.0)
    last_second = sum(1 for t in times if 19.0 <= t < 20.0)
    assert during_first_second < 60  # about 50-55/s just after the pause
    assert abs(last_second - 100) <= 2  # fully recovered after 10 s
    middle = sum(1 for t in times if 11.0 <= t < 12.0)
    assert during_first_second < middle < last_second  # climbing, not jumping back


def test_a_window_of_throttled_replies_halves_the_pace_once() -> None:
    pacer = Pacer(100.0, throttle_delay=1.0)
    sent = run_saturated(pacer, 0.0, 1.0)
    for sent_at in sent[-10:]:  # ten submits in flight all come back throttled
        pacer.throttled(1.0, sent_at)
    assert pacer.pace(2.0) == pytest.approx(50.0)
    assert pacer.paused_until == pytest.approx(2.0)


def test_repeated_throttling_lowers_the_pace_to_a_floor_and_backs_off_capped() -> None:
    pacer = Pacer(100.0, throttle_delay=1.0, throttle_max_delay=8.0, recovery=60.0, min_rate=5.0)
    now = 0.0
    delays = []
    for _ in range(10):
        pacer.sent(now)
        resume = pacer.throttled(now + 0.01, sent_at=now)
        delays.append(resume - (now + 0.01))
        now = resume
    assert delays[:4] == pytest.approx([1.0, 2.0, 4.0, 8.0])
    assert max(delays) == pytest.approx(8.0)
    assert pacer.pace(now) == pytest.approx(5.0)


def test_a_throttled_sender_still_sends_eventually() -> None:
    pacer = Pacer(10.0, throttle_delay=2.0, recovery=5.0)
    pacer.throttled(0.0, sent_at=0.0)
    assert pacer.next_send_at(0.0) == pytest.approx(2.0)
    times = run_saturated(pacer, 0.0, 4.0)
    assert times and times[0] == pytest.approx(2.0)


def test_window_holds_at_most_its_size_and_matches_answers_by_sequence() -> None:
    window: Window[str] = Window(2, timeout=10.0)
    window.open(1, "a", 0.0)
    assert window.has_room
    window.open(2, "b", 1.0)
    assert not window.has_room
    with pytest.raises(ValueError):
        window.open(2, "c", 1.0)
    entry = window.close(1)
    assert entry is not None and entry.item == "a"
    assert window.close(1) is None  # a second answer to the same request resolves nothing
    assert window.has_room and len(window) == 1


def test_window_expires_only_what_is_overdue_each_once() -> None:
    window: Window[str] = Window(10, timeout=10.0)
    for seq in range(1, 6):
        window.open(seq, f"m{seq}", float(seq))
    window.close(2)
    assert window.next_deadline() == pytest.approx(11.0)
    gone = window.expired(13.5)
    assert [e.item for e in gone] == ["m1", "m3"]
    assert window.expired(13.5) == []
    assert window.next_deadline() == pytest.approx(14.0)
    assert [e.item for e in window.drain()] == ["m4", "m5"]
    assert len(window) == 0 and window.drain() == []


def test_backoff_doubles_is_capped_and_jittered() -> None:
    backoff = Backoff(1.0, 30.0, random.Random(7))
    delays = [backoff.next_delay() for _ in range(20)]
    steps = [min(30.0, 2.0**n) for n in range(20)]
    for delay, step in zip(delays, steps, strict=True):
        assert step / 2 <= delay <= step
    assert max(delays) <= 30.0
    assert len({round(d, 6) for d in delays[-10:]}) > 1  # jitter: instances do not reconnect in step
    backoff.reset()
    assert backoff.next_delay() <= 1.0


def test_backoff_refuses_impossible_delays() -> None:
    with pytest.raises(ValueError):
        Backoff(5.0, 1.0)


def test_status_classes() -> None:
    assert not is_permanent(ESME_RTHROTTLED) and not is_permanent(ESME_RMSGQFUL)
    assert not is_permanent(0x08)  # system error: try again later
    assert is_permanent(0x0B)  # invalid destination address
    assert not is_permanent(0x0A)  # a source address not provisioned: the operator can fix it
    assert not is_permanent(0x0401)  # a vendor's code: unknown, so worth a later attempt


def test_after_full_recovery_a_new_throttling_episode_starts_from_the_shortest_pause() -> None:
    pacer = Pacer(100.0, throttle_delay=1.0, throttle_max_delay=8.0, recovery=5.0)
    assert pacer.throttled(0.0, sent_at=0.0) == pytest.approx(1.0)
    assert pacer.throttled(1.5, sent_at=1.2) == pytest.approx(3.5)  # again before recovery: doubled
    assert pacer.pace(20.0) == 100.0
    assert pacer.throttled(20.0, sent_at=19.9) == pytest.approx(21.0)
