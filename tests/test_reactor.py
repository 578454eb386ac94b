"""The reactor of ``gateway run`` (gateway.reactor): epoll, ready sockets taken in turns."""

from __future__ import annotations

import socket

import pytest
from twisted.internet import epollreactor

from gateway.reactor import TurnTakingEPollReactor


class Reader:
    """A readable socket that counts how often the reactor asked it to read."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reads = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self) -> None:
        self.reads += 1
        self.sock.recv(1)

    def logPrefix(self) -> str:
        return "Reader"

    def connectionLost(self, reason: object) -> None:
        pass


@pytest.fixture
def readers() -> list[Reader]:
    pairs = [socket.socketpair() for _ in range(10)]
    for near, _ in pairs:
        near.setblocking(False)
    for _, far in pairs:
        far.sendall(b"x")
    yield [Reader(near) for near, _ in pairs]
    for near, far in pairs:
        near.close()
        far.close()


def test_a_turn_takes_at_most_the_cap_of_ready_sockets(readers: list[Reader]) -> None:
    reactor = TurnTakingEPollReactor(max_events_per_turn=4)
    for reader in readers:
        reactor.addReader(reader)
    reactor.doIteration(0)
    assert sum(r.reads for r in readers) == 4
    reactor.doIteration(0)
    reactor.doIteration(0)
    assert sum(r.reads for r in readers) == 10
    assert all(r.reads == 1 for r in readers), "the ones left over come first in the next turn"
    reactor.removeAll()


def test_thread_hand_backs_run_between_chunks(readers: list[Reader]) -> None:
    """What another thread hands back runs after one chunk of ready sockets, not after all."""
    reactor = TurnTakingEPollReactor(max_events_per_turn=4)
    for reader in readers:
        reactor.addReader(reader)
    reads_when_handed_back: list[int] = []
    reactor.callFromThread(lambda: reads_when_handed_back.append(sum(r.reads for r in readers)))
    reactor.doIteration(0)
    reactor.runUntilCurrent()
    assert reads_when_handed_back and reads_when_handed_back[0] <= 4  # Twisted's own: all 10
    reactor.removeAll()


def test_it_is_twisteds_epoll_reactor_and_refuses_a_cap_below_one() -> None:
    assert issubclass(TurnTakingEPollReactor, epollreactor.EPollReactor)
    with pytest.raises(ValueError, match="at least 1"):
        TurnTakingEPollReactor(max_events_per_turn=0)
