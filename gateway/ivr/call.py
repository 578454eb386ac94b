"""One rating call, sans-I/O: the AGI wire (``agi.py``) joined to the dialogue (``dialogue.py``).

Both adapters — the Twisted FastAGI server and the classic AGI script — feed it bytes and
carry out what it returns: bytes to write, a rating or a detail to store, the call's end.
So the rules of a call (SPEC R2.1–R2.5) live in one place, whatever carries the bytes.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

from gateway.intake import MAX_FIELD_LENGTH
from gateway.ivr import agi
from gateway.ivr.dialogue import (
    ConnectionLost,
    Dialogue,
    DialogueSettings,
    Finish,
    NotRated,
    Outcome,
    PeerStalled,
    Rated,
    RatingStored,
    SendCommand,
    StoreDetail,
    StoreFailed,
    StoreRating,
)

log = logging.getLogger("gateway.ivr")

#: The AGI script name(s) this dialogue answers: ``agi://host:4573/rating?...``.
RATING_SCRIPTS = frozenset({"rating", "gateway-agi"})


def hand_off_from_request(request: agi.AGIRequest) -> dict[str, str | None]:
    """The call's identifiers (SPEC R2.1) from the AGI URL's query or ``key=value`` arguments.

    The channel's own unique id and caller number fill in what the dialplan did not pass.
    """
    params = request.params

    def param(*names: str) -> str | None:
        for name in names:
            value = (params.get(name) or "").strip()
            if value:
                return value
        return None

    hand_off = {
        "call_id": param("call_id") or request.unique_id or None,
        "linked_id": param("linked_id"),
        "agent_id": param("agent", "agent_id"),
        "work_order": param("work_order"),
        "matter_code": param("matter", "matter_code"),
        "queue": param("queue"),
        "caller": param("caller") or request.caller_id,
    }
    # A call cannot be refused as the intake refuses a record: an identifier longer than its
    # column is made to fit, so that the key is stored all the same (R2.4).
    for name, value in hand_off.items():
        limit = MAX_FIELD_LENGTH.get(name)
        if value is not None and limit is not None and len(value) > limit:
            log.warning("event=agi.identifier_shortened field=%s length=%d limit=%d", name, len(value), limit)
            hand_off[name] = shorten(value, limit)
    return hand_off


def shorten(value: str, limit: int) -> str:
    """``value`` in ``limit`` characters: its start, ``~`` and a digest of the whole.

    Not a plain cut: two call ids that differ only after the limit stay two calls (R1.4), and
    the same long id always gives the same short one, whichever adapter carried it.
    """
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:11]
    return value[: limit - len(digest) - 1] + "~" + digest


@dataclass(frozen=True)
class Write:
    data: bytes


@dataclass(frozen=True)
class Close:
    """Close the connection: the dialplan goes on (closing is success, fixture t)."""

    outcome: Outcome | None
    problem: str | None = None


Output = Write | StoreRating | StoreDetail | Close


class RatingCall:
    """Feeds the wire to the dialogue and turns its actions into outputs for an adapter."""

    def __init__(
        self, settings: DialogueSettings, *, max_line_length: int = agi.MAX_LINE_LENGTH, check_script: bool = True
    ) -> None:
        """``check_script``: FastAGI routes by URL path; a classic script is whatever Asterisk ran."""
        self.settings = settings
        self.check_script = check_script
        self.connection = agi.AGIConnection(max_line_length=max_line_length)
        self.dialogue: Dialogue | None = None
        self.request: agi.AGIRequest | None = None
        self.hand_off: dict[str, str | None] = {}
        self.closed = False
        self.outcome: Outcome | None = None

    @property
    def call_id(self) -> str | None:
        return self.hand_off.get("call_id")

    def receive_data(self, data: bytes) -> list[Output]:
        """Bytes from Asterisk (``b""``: the peer closed)."""
        self.connection.receive_data(data)
        return self._drain()

    def store_done(self) -> list[Output]:
        return self._feed(RatingStored())

    def store_failed(self, reason: str) -> list[Output]:
        return self._feed(StoreFailed(reason))

    def stalled(self) -> list[Output]:
        """The peer sent nothing for too long."""
        if self.dialogue is None:
            return self._close(None, "no AGI environment received in time")
        return self._feed(PeerStalled())

    def lost(self) -> list[Output]:
        """The transport went away (reset, or closed by us)."""
        if self.dialogue is None or self.closed:
            self.closed = True
            return []
        return self._feed(ConnectionLost())

    def shut_down(self) -> list[Output]:
        """The gateway is stopping and this call did not end in time: end it now (not rated, error)."""
        if self.closed:
            return []
        if self.dialogue is None:
            return self._close(None, "the gateway shut down before the AGI environment came")
        return self._feed(ConnectionLost(problem="the gateway shut down during the call"))

    def _drain(self) -> list[Output]:
        outputs: list[Output] = []
        for event in self.connection.events():
            if self.closed:
                break
            if isinstance(event, agi.EnvironmentReady):
                outputs.extend(self._start(event.request))
            elif isinstance(event, agi.ProtocolError | agi.ConnectionClosed):
                if isinstance(event, agi.ProtocolError):
                    log.warning("event=agi.protocol_error call_id=%s reason=%r", self.call_id, event.reason)
                if self.dialogue is None:
                    outputs.extend(self._close(None, "the AGI environment was broken or cut short"))
                elif isinstance(event, agi.ProtocolError):
                    outputs.extend(self._feed(ConnectionLost(problem="Asterisk sent a line that is not AGI")))
                else:
                    outputs.extend(self._feed(ConnectionLost()))
            else:
                outputs.extend(self._feed(event))
        return outputs

    def _start(self, request: agi.AGIRequest) -> list[Output]:
        self.request = request
        self.hand_off = hand_off_from_request(request)
        script = request.script.strip("/").rsplit("/", 1)[-1]
        if self.check_script and script not in RATING_SCRIPTS:
            log.warning("event=agi.unknown_script script=%r", request.script[:80])
            return self._close(None, f"unknown AGI script {request.script[:80]!r}; use agi://host:port/rating")
        self.dialogue = Dialogue(self.settings, self.call_id or "unknown")
        return self._actions(self.dialogue.start())

    def _feed(self, event: Any) -> list[Output]:
        if self.dialogue is None or self.closed:
            return []
        try:
            actions = self.dialogue.handle(event)
        except Exception as error:  # an illegal event: end this call, never the process
            log.error("event=agi.dialogue_error call_id=%s error=%s", self.call_id, type(error).__name__)
            outcome = self.dialogue.outcome
            return self._close(outcome, f"dialogue error: {error}")
        return self._actions(actions)

    def _actions(self, actions: list[Any]) -> list[Output]:
        outputs: list[Output] = []
        for action in actions:
            if isinstance(action, SendCommand):
                try:
                    outputs.append(Write(self.connection.send_command(action.text)))
                except agi.AGIProtocolError as error:
                    # The connection is gone or broken: tell the dialogue, which may still
                    # have a rating to store (SPEC R2.4).
                    log.info("event=agi.send_refused call_id=%s reason=%s", self.call_id, type(error).__name__)
                    outputs.extend(self._feed(ConnectionLost()))
            elif isinstance(action, StoreRating | StoreDetail):
                outputs.append(action)
            elif isinstance(action, Finish):
                outputs.extend(self._close(action.outcome, action.problem))
        return outputs

    def _close(self, outcome: Outcome | None, problem: str | None) -> list[Output]:
        if self.closed:
            return []
        self.closed = True
        self.outcome = outcome
        return [Close(outcome, problem)]


def describe(outcome: Outcome | None) -> str:
    """``outcome=rated level=4 attempts=1`` for a log line (no personal data)."""
    if isinstance(outcome, Rated):
        return f"outcome=rated level={int(outcome.level)} attempts={outcome.attempts}"
    if isinstance(outcome, NotRated):
        return f"outcome=not_rated reason={outcome.reason} attempts={outcome.attempts}"
    return "outcome=none"
