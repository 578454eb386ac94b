"""The reactor ``gateway run`` installs: Twisted's epoll reactor, taking ready sockets in turns.

Twisted's epoll reactor asks the kernel for every ready socket at once and handles them all
before it looks at anything else. Under load (hundreds of FastAGI calls answering together)
one such turn lasts several milliseconds, and what other threads handed back meanwhile with
``callFromThread`` waits for the end of it: a rating's durable write, which the call's next
command waits for (SPEC R2.4), came back 2-3 ms (p50) and 16-23 ms (p99) after the store
thread had committed it. Taking at most ``MAX_EVENTS_PER_TURN`` ready sockets per turn lets
the reactor run those hand-backs (and due timers) between chunks; the sockets left over are
still ready (epoll is level-triggered) and come first in the next turn. Measured at 500
concurrent calls: hand-back p99 5.7-6.5 ms, for a few hundred more ``epoll_wait`` calls a
second (docs/performance.md).
"""

from __future__ import annotations

import errno

from twisted.internet import epollreactor
from twisted.python import log

#: Ready sockets handled per turn of the loop before thread hand-backs and timers run.
MAX_EVENTS_PER_TURN = 16


class TurnTakingEPollReactor(epollreactor.EPollReactor):
    """:class:`EPollReactor` whose turns handle at most ``max_events_per_turn`` ready sockets."""

    def __init__(self, max_events_per_turn: int = MAX_EVENTS_PER_TURN) -> None:
        if max_events_per_turn < 1:
            raise ValueError(f"max_events_per_turn must be at least 1, not {max_events_per_turn}")
        self.max_events_per_turn = max_events_per_turn
        super().__init__()

    def doPoll(self, timeout: float | None) -> None:
        """Twisted's ``EPollReactor.doPoll``: events per call capped, no logging context per event."""
        try:
            events = self._poller.poll(
                -1 if timeout is None else timeout, min(len(self._selectables), self.max_events_per_turn) or 1
            )
        except OSError as error:
            if error.errno == errno.EINTR:
                return
            raise
        handle = self._doReadOrWrite
        selectables = self._selectables
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is not None:
                # Not through log.callWithLogger, which pushes a logging context per event
                # so that legacy twisted.python.log lines name the connection: this process
                # logs with the standard library, and the wrapper cost ~8 % of the reactor
                # thread at 500 calls. _doReadOrWrite already catches what a read or write
                # raises and closes that connection alone; this is the last net.
                try:
                    handle(selectable, fd, event)
                except Exception:
                    log.err(None, "error while handling a socket event")

    doIteration = doPoll


def install(max_events_per_turn: int = MAX_EVENTS_PER_TURN) -> TurnTakingEPollReactor:
    """Install :class:`TurnTakingEPollReactor` as Twisted's global reactor (before any import of it)."""
    from twisted.internet.main import installReactor

    reactor = TurnTakingEPollReactor(max_events_per_turn)
    installReactor(reactor)
    return reactor
