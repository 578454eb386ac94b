"""Reconnect backoff of the SMPP link: reset only by a link that stayed bound (no tight reconnect loop).

An SMSC that accepts the bind and drops the link at once (a flapping peer, a full SMSC that
unbinds right after the bind, a firewall cutting connections) used to be reconnected at the
minimum delay forever, since every successful bind reset the backoff. The delays now go back to
the minimum only after the link stayed bound for ``max(reconnect_max_delay, enquire_link_interval)``.

Most tests drive the I/O loop's decisions with a simulated clock: the bind answer goes through
``_Link._handle`` as read from the socket, the drop through ``_Link._drop`` as the loop calls it,
and the delay is read from when the link plans to reconnect. One test checks the same against the
fault-injecting SMSC on loopback, in real time.
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import defer

from gateway.sms.link import Backoff
from gateway.sms.smpp import LinkDropped, SmppClient, _Client, _Connection, _Link
from gateway.testing.reactor import run_on_reactor, sleep
from gateway.testing.smsc import Fault, Smsc, encode_pdu
from tests.test_smpp_client import Ticker, smpp_config

ESME_RINVPASWD = 0x0E

# -- Backoff alone ----------------------------------------------------------------------------------


def test_backoff_grows_while_the_link_drops_soon_after_each_bind() -> None:
    backoff = Backoff(1.0, 16.0, random.Random(3), stable_after=16.0)
    now = 0.0
    for step in [1.0, 2.0, 4.0, 8.0, 16.0, 16.0, 16.0]:
        backoff.bound(now)
        now += 15.9  # up, but not for the stable period
        delay = backoff.dropped(now)
        assert step / 2 <= delay <= step
        now += delay


def test_backoff_is_reset_by_a_link_that_stayed_bound_for_the_stable_period() -> None:
    backoff = Backoff(1.0, 16.0, random.Random(3), stable_after=20.0)
    for _ in range(6):
        backoff.dropped(0.0)  # six failed connects: at the cap
    assert backoff.step() == 16.0
    backoff.bound(100.0)
    assert 0.5 <= backoff.dropped(120.0) <= 1.0
    assert 1.0 <= backoff.dropped(121.0) <= 2.0  # a failed connect after that: growing again
    backoff.bound(130.0)
    assert 2.0 <= backoff.dropped(131.0) <= 4.0  # bound once, long ago, counts for nothing now


def test_backoff_stable_period_defaults_to_the_longest_delay() -> None:
    backoff = Backoff(1.0, 30.0, random.Random(3))
    assert backoff.stable_after == 30.0


# -- the I/O loop's decisions, with a simulated clock -------------------------------------------------


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Harness:
    """A ``_Link`` on a simulated clock whose connections are socketpairs: no SMSC, no real time."""

    def __init__(self, **config: Any) -> None:
        self.clock = FakeClock()
        self.events: list[tuple[Any, ...]] = []
        self.link = _Link(smpp_config(1, **config), self.events.extend, self.clock, random.Random(11))
        self._peers: list[socket.socket] = []

    def close(self) -> None:
        self.link._close_all()
        for peer in self._peers:
            peer.close()
        self.link._wake_r.close()
        self.link._wake_w.close()

    def _binding(self) -> _Connection:
        """A connection as ``_connected`` leaves it: the bind (sequence 1) written, not answered."""
        ours, theirs = socket.socketpair()
        self._peers.append(theirs)
        conn = _Connection(
            len(self._peers), "transceiver", _Client("127.0.0.1", 1, 1.0), ours, phase="binding", bind_sequence=1
        )
        conn.deadline = self.clock.now + 1.0
        self.link.connections = [conn]
        self.link.phase = "binding"
        return conn

    def bind(self, status: int = 0) -> None:
        """The SMSC answers the bind; a refusal drops the link, as the loop does with LinkDropped."""
        conn = self._binding()
        answer = encode_pdu("bind_transceiver_resp", 1, status, **({} if status else {"system_id": "smsc"}))
        try:
            self.link._handle(conn, answer, self.clock.now)
        except LinkDropped as error:
            self.link._drop(str(error))
            return
        assert self.link.bound

    def drop(self, after: float) -> None:
        """The SMSC closes the link ``after`` seconds."""
        self.clock.now += after
        self.link._drop("the SMSC closed the connection")

    def next_delay(self) -> float:
        """The delay the link chose after the last drop; the clock moves on to the reconnect."""
        assert not self.link.connections and self.link.phase == "backoff"
        delay = self.link._reconnect_at - self.clock.now
        self.clock.now = self.link._reconnect_at
        return delay


@pytest.fixture
def harness() -> Iterator[Any]:
    made: list[Harness] = []

    def make(**config: Any) -> Harness:
        made.append(Harness(**config))
        return made[-1]

    yield make
    for each in made:
        each.close()


def assert_delays(delays: list[float], steps: list[float]) -> None:
    """Each delay is drawn between half and all of its step (jitter)."""
    assert len(delays) == len(steps)
    for delay, step in zip(delays, steps, strict=True):
        assert step / 2 <= delay <= step, f"delays {delays} do not follow the steps {steps}"


def test_an_smsc_dropping_the_link_right_after_each_bind_gets_growing_delays_up_to_the_cap(harness: Any) -> None:
    h = harness(reconnect_min_delay=1.0, reconnect_max_delay=16.0, enquire_link_interval=5.0)
    delays = []
    for _ in range(8):
        h.bind()
        h.drop(after=0.01)
        delays.append(h.next_delay())
    assert_delays(delays, [1.0, 2.0, 4.0, 8.0, 16.0, 16.0, 16.0, 16.0])
    assert h.link.reconnects == 8
    h.link._flush_events()  # as the loop does after each iteration
    assert [e[0] for e in h.events] == ["bound", "unbound"] * 8


def test_a_link_that_stayed_bound_for_the_stable_period_is_reconnected_at_the_minimum_delay(harness: Any) -> None:
    # stable period: max(reconnect_max_delay 16 s, enquire_link_interval 5 s) = 16 s
    h = harness(reconnect_min_delay=1.0, reconnect_max_delay=16.0, enquire_link_interval=5.0)
    delays = []
    for _ in range(5):
        h.bind()
        h.drop(after=0.01)
        delays.append(h.next_delay())
    h.bind()
    h.drop(after=15.0)  # just short of the stable period: still at the cap
    delays.append(h.next_delay())
    h.bind()
    h.drop(after=16.5)  # past it: back at the minimum
    delays.append(h.next_delay())
    h.bind()
    h.drop(after=0.01)  # and a flap after that grows again from there
    delays.append(h.next_delay())
    assert_delays(delays, [1.0, 2.0, 4.0, 8.0, 16.0, 16.0, 1.0, 2.0])


def test_the_stable_period_is_at_least_the_enquire_link_interval(harness: Any) -> None:
    # stable period: max(reconnect_max_delay 4 s, enquire_link_interval 30 s) = 30 s
    h = harness(reconnect_min_delay=1.0, reconnect_max_delay=4.0, enquire_link_interval=30.0)
    delays = []
    for up in [0.01, 0.01, 0.01, 20.0, 31.0]:
        h.bind()
        h.drop(after=up)
        delays.append(h.next_delay())
    assert_delays(delays, [1.0, 2.0, 4.0, 4.0, 1.0])


def test_a_refused_bind_still_jumps_the_backoff_and_a_bind_dropped_at_once_does_not_undo_it(harness: Any) -> None:
    h = harness(reconnect_min_delay=1.0, reconnect_max_delay=64.0, enquire_link_interval=5.0)
    delays = []
    h.bind(status=ESME_RINVPASWD)  # from the first refusal: at least the fourth step (do not hammer)
    delays.append(h.next_delay())
    assert not h.link.bound and "ESME_RINVPASWD" in (h.link.last_error or "")
    h.bind()
    h.drop(after=0.01)  # accepted, then dropped at once: the delays keep growing
    delays.append(h.next_delay())
    h.bind(status=ESME_RINVPASWD)
    delays.append(h.next_delay())
    h.bind()
    h.drop(after=100.0)  # a link that stayed up: back at the minimum
    delays.append(h.next_delay())
    h.bind(status=ESME_RINVPASWD)  # and a refusal jumps again to the fourth step
    delays.append(h.next_delay())
    assert_delays(delays, [8.0, 16.0, 32.0, 1.0, 8.0])


# -- against the fault-injecting SMSC, in real time ------------------------------------------------------


def test_an_smsc_that_unbinds_right_after_every_bind_is_not_hammered() -> None:
    # reconnect delays 0.05 s doubling to 0.4 s; the stable period is the 5 s enquire_link interval
    with Smsc(fault=Fault(unbind_after_pdus=1)) as smsc:

        async def scenario(reactor: Any) -> None:
            client = SmppClient(smpp_config(smsc.port), reactor, lambda m: defer.succeed(None))
            ticker = Ticker(reactor)
            client.startService()
            try:
                await sleep(reactor, 1.5)
                binds = smsc.binds
            finally:
                await client.stopService()
                ticker.stop()
            # Delays of at least 0.025, 0.05, 0.1, 0.2, 0.2, … s: at most 10 binds in 1.5 s. Reset
            # on every bind, the delays stayed at 0.025-0.05 s: 25 binds and more.
            assert 3 <= binds <= 10, f"{binds} binds in 1.5 s"
            assert client.state()["reconnects"] >= 3
            assert ticker.max_gap < 0.25

        started = time.monotonic()
        run_on_reactor(scenario)
        assert time.monotonic() - started < 10
