"""The voice rating dialogue (SPEC R2.2–R2.5) as an explicit state machine: events in, actions out.

After a 12345 call the caller lands here. The dialogue decides which AGI command to send next
and when a rating is to be stored; the adapter (FastAGI listener or classic-AGI script) does
the I/O: it sends :class:`SendCommand` texts through :class:`gateway.ivr.agi.AGIConnection`,
hands back every :class:`~gateway.ivr.agi.CommandResponse` and
:class:`~gateway.ivr.agi.HangupNotice`, runs :class:`StoreRating` / :class:`StoreDetail`
against the store, reports :class:`RatingStored` or :class:`StoreFailed`, and closes the
connection on :class:`Finish` (closing is success: the dialplan goes on).

The flow, with the state names of :class:`DialogueState`::

    ANSWERING ─► MENU ─(valid key)─► STORING ─(RatingStored)─► SETTING_VARIABLE
                 │ ▲                    │                            │
       (invalid, │ │                    └─(StoreFailed)─► GOODBYE     ├─► REASON_MENU    (bad, opt.)
        timeout) ▼ │                                                 ├─► COMMENT_PROMPT (bad, opt.)
                 HINT                                                │     └─► RECORDING
                 │ (max_attempts failed)                             ▼
                 └──────────► GOODBYE ─► FINISHED ◄──────────────── THANKS

    A ``result=-1`` to a prompt ─► CHECKING_CHANNEL: ``CHANNEL STATUS`` answers 511 when the
    caller hung up, 200 when the channel is up and the prompt file is missing (fixture h).
    A hang-up (HANGUP line, SIGHUP, 511) ends the dialogue at the next answer, except that a
    key already received is stored and handed to the dialplan first (SPEC R2.4).

Everything the caller does is judged here, never by Asterisk: every key is an escape digit of
the menu so that an invalid key is heard and answered (fixture d2), and the menu is one GET
OPTION so that a key during or right after the prompt is taken (barge-in, fixture r).
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from gateway.ivr.agi import (
    DTMF_KEYS,
    AGIProtocolError,
    AGIResponseError,
    CommandResponse,
    HangupNotice,
    Response,
    channel_status,
    get_option,
    key_from_result,
    record_file,
    set_variable,
    stream_file,
)
from gateway.rating import KeyMap, Level

#: Prompt names: a contract with ``prompts/`` (the audio files exist under these names).
PROMPT_MENU = "hcp-rating-menu"
PROMPT_INVALID = "hcp-rating-invalid"
PROMPT_TIMEOUT = "hcp-rating-timeout"
PROMPT_THANKS = "hcp-rating-thanks"
PROMPT_GOODBYE = "hcp-rating-goodbye"
PROMPT_REASON_MENU = "hcp-rating-reason-menu"
PROMPT_COMMENT = "hcp-rating-comment"
PROMPT_COMMENT_THANKS = "hcp-rating-comment-thanks"

#: The channel variable that hands the level code (SPEC R1.2) to the dialplan.
RATING_VARIABLE = "HCP_RATING"

#: Every key is an escape digit of the rating menu: an invalid key must interrupt the prompt
#: so that we can say so (SPEC R2.3); Asterisk would swallow it otherwise (fixture d2).
ALL_KEYS = "0123456789*#"

#: The key that skips the reason menu or the voice comment (SPEC R2.5: skipping is allowed).
SKIP_KEY = "#"


# Every call sends the same few commands: their texts are built and checked once.
@functools.lru_cache(maxsize=64)
def _get_option_text(name: str, escape_digits: str, timeout_ms: int) -> str:
    return get_option(name, escape_digits, timeout_ms).text


@functools.lru_cache(maxsize=64)
def _stream_file_text(name: str, escape_digits: str) -> str:
    return stream_file(name, escape_digits).text


@functools.lru_cache(maxsize=64)
def _set_variable_text(name: str, value: str) -> str:
    return set_variable(name, value).text


def _default_reason_keys() -> Mapping[str, str]:
    return MappingProxyType({"1": "attitude", "2": "efficiency", "3": "unresolved", "4": "other"})


_SAFE_ID = re.compile(r"[^A-Za-z0-9._-]")


def safe_call_id(call_id: str) -> str:
    """``call_id`` made safe as one file name: it can never leave the comment directory.

    Anything but letters, digits, ``.``, ``_`` and ``-`` becomes ``_`` (so no ``/``), leading
    dots are dropped (so no ``..``), and the length is capped. Asterisk unique ids
    (``1795370491.70``) pass unchanged.
    """
    cleaned = _SAFE_ID.sub("_", call_id)[:80].lstrip(".")
    return cleaned or "unknown"


@dataclass(frozen=True)
class DialogueSettings:
    """How the rating dialogue behaves; built once from the ``[agi]`` configuration.

    ``wait_ms`` is the time to press a key after the prompt (SPEC R2.3, 5 s);
    ``max_attempts`` the menus offered before giving up (R2.3, 3); ``reason_menu`` and
    ``voice_comment`` switch on the bad-rating detail (R2.5), offered after 不满意 and
    非常不满意 only. ``comment_path_template`` is where Asterisk's RECORD FILE writes (a path on
    the Asterisk host, without extension: Asterisk appends ``.<comment_format>``);
    ``{call_id}`` in it is replaced by :func:`safe_call_id` of the call id. Prompts are played
    as ``<prompt_dir>/<name>``.
    """

    key_map: KeyMap = field(default_factory=KeyMap.hotline_default)
    max_attempts: int = 3
    wait_ms: int = 5000
    prompt_dir: str = "hcp"
    reason_menu: bool = False
    reason_keys: Mapping[str, str] = field(default_factory=_default_reason_keys)
    voice_comment: bool = False
    comment_max_s: int = 60
    comment_silence_s: int | None = 3
    comment_path_template: str = "/var/spool/asterisk/hcp-comments/{call_id}"
    comment_format: str = "wav"
    answer_first: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.max_attempts < 1:
            problems.append(f"max_attempts must be at least 1, not {self.max_attempts}")
        if self.wait_ms < 1:
            problems.append(f"wait_ms must be positive, not {self.wait_ms}")
        if self.comment_max_s < 1:
            problems.append(f"comment_max_s must be positive, not {self.comment_max_s}")
        if self.comment_silence_s is not None and self.comment_silence_s < 1:
            problems.append("comment_silence_s must be at least 1 second, or None for no limit")
        for key, code in self.reason_keys.items():
            if len(key) != 1 or key not in DTMF_KEYS or key == SKIP_KEY:
                problems.append(f"reason key {key!r} must be one DTMF key other than {SKIP_KEY}")
            if not code:
                problems.append(f"reason key {key!r} has an empty reason code")
        if self.comment_path_template.count("{call_id}") != 1:
            problems.append(
                "comment_path_template must contain {call_id} exactly once, e.g. "
                "/var/spool/asterisk/hcp-comments/{call_id}"
            )
        if problems:
            raise ValueError("invalid rating dialogue settings: " + "; ".join(problems))

    def prompt(self, name: str) -> str:
        """The file name Asterisk plays for a prompt name."""
        return f"{self.prompt_dir.rstrip('/')}/{name}" if self.prompt_dir else name

    def comment_path(self, call_id: str) -> str:
        """Where the voice comment of ``call_id`` is recorded (without extension)."""
        return self.comment_path_template.replace("{call_id}", safe_call_id(call_id))


# --------------------------------------------------------------------------------------------
# Outcomes, actions and events


@dataclass(frozen=True)
class Rated:
    """A valid key was received and stored (SPEC R2.2); kept even if the caller then hung up.

    ``attempts`` is the menu offer during which the key came (1 = the first).
    """

    level: Level
    key: str
    attempts: int
    reason_codes: tuple[str, ...] = ()
    comment_ref: str | None = None


NotRatedReason = Literal["timeout", "invalid", "hangup", "error"]


@dataclass(frozen=True)
class NotRated:
    """The call ends without a stored rating (SPEC R2.3, R2.4): eligible for an SMS invitation.

    ``reason``: ``timeout`` or ``invalid`` after ``max_attempts`` failed attempts (the kind of
    the *last* failure, which is what the caller heard last); ``hangup`` when the caller (or
    the line) went before a valid key; ``error`` when the dialogue could not go on (a prompt
    file missing, Asterisk refusing a command or not answering, the store failing).
    ``attempts`` counts the menus offered (0 when the caller left before the first).
    """

    reason: NotRatedReason
    attempts: int
    detail: str | None = None


Outcome = Rated | NotRated


@dataclass(frozen=True)
class SendCommand:
    """Send this AGI command (``AGIConnection.send_command(text)``) and report its answer."""

    text: str


@dataclass(frozen=True)
class StoreRating:
    """Store the rating now; answer with :class:`RatingStored` or :class:`StoreFailed`.

    Nothing more is sent to Asterisk until then: the rating is stored before the thank-you
    (SPEC R2.2) and is never lost to a hang-up (R2.4).
    """

    level: Level
    key: str
    attempts: int


@dataclass(frozen=True)
class StoreDetail:
    """Add bad-rating detail to the stored rating (SPEC R2.5); no answer is awaited."""

    reason: str | None = None
    comment_ref: str | None = None


@dataclass(frozen=True)
class Finish:
    """The dialogue is over: record the outcome and close the AGI connection.

    ``problem`` names something an operator should fix (a missing prompt file, a failed
    recording, a refused command), whatever the outcome; it never holds personal data.
    """

    outcome: Outcome
    problem: str | None = None


Action = SendCommand | StoreRating | StoreDetail | Finish


@dataclass(frozen=True)
class RatingStored:
    """The adapter stored what :class:`StoreRating` asked for."""


@dataclass(frozen=True)
class StoreFailed:
    """The adapter could not store the rating (``reason`` without personal data)."""

    reason: str


@dataclass(frozen=True)
class PeerStalled:
    """Asterisk did not answer the outstanding command in time (the adapter's timer)."""


@dataclass(frozen=True)
class ConnectionLost:
    """The AGI connection is gone, or the adapter ends it.

    Without ``problem`` Asterisk closed or reset it (the caller hung up, as far as the rating
    goes: R2.4). With one, the call ends for that reason (a protocol error, the gateway
    shutting down): not rated with reason ``error`` (R2.3), unless a key was received.
    """

    problem: str | None = None


Event = CommandResponse | HangupNotice | RatingStored | StoreFailed | PeerStalled | ConnectionLost


class DialogueState(enum.Enum):
    """Where the dialogue stands; each state but STORING and FINISHED has one command out."""

    NEW = "new"
    ANSWERING = "answering"
    MENU = "menu"
    HINT = "hint"
    GOODBYE = "goodbye"
    STORING = "storing"
    SETTING_VARIABLE = "setting_variable"
    REASON_MENU = "reason_menu"
    COMMENT_PROMPT = "comment_prompt"
    RECORDING = "recording"
    THANKS = "thanks"
    CHECKING_CHANNEL = "checking_channel"
    FINISHED = "finished"


_LINE_EVENTS = frozenset({CommandResponse, HangupNotice, PeerStalled, ConnectionLost})

#: Which events each state accepts; anything else is an :class:`IllegalDialogueEvent`.
ALLOWED_EVENTS: Mapping[DialogueState, frozenset[type]] = MappingProxyType(
    {
        DialogueState.NEW: frozenset(),
        DialogueState.ANSWERING: _LINE_EVENTS,
        DialogueState.MENU: _LINE_EVENTS,
        DialogueState.HINT: _LINE_EVENTS,
        DialogueState.GOODBYE: _LINE_EVENTS,
        DialogueState.STORING: frozenset({RatingStored, StoreFailed, HangupNotice, PeerStalled, ConnectionLost}),
        DialogueState.SETTING_VARIABLE: _LINE_EVENTS,
        DialogueState.REASON_MENU: _LINE_EVENTS,
        DialogueState.COMMENT_PROMPT: _LINE_EVENTS,
        DialogueState.RECORDING: _LINE_EVENTS,
        DialogueState.THANKS: _LINE_EVENTS,
        DialogueState.CHECKING_CHANNEL: _LINE_EVENTS,
        # Asterisk may still send HANGUP (e.g. after the half-close), and the socket closes.
        DialogueState.FINISHED: frozenset({HangupNotice, PeerStalled, ConnectionLost}),
    }
)


class IllegalDialogueEvent(RuntimeError):
    """An event the dialogue cannot take in its current state: a bug in the adapter.

    The dialogue's state is left unchanged, so an adapter may still wait for a pending
    :class:`RatingStored`.
    """

    def __init__(self, state: DialogueState, event: object, why: str) -> None:
        self.state = state
        self.event = event
        name = event if isinstance(event, str) else type(event).__name__
        super().__init__(f"{name} is not allowed in rating dialogue state {state.name}: {why}")


#: States in which a prompt plays, so that ``result=-1`` may mean a missing file.
_PROMPT_STATES = frozenset(
    {
        DialogueState.ANSWERING,
        DialogueState.MENU,
        DialogueState.HINT,
        DialogueState.GOODBYE,
        DialogueState.REASON_MENU,
        DialogueState.COMMENT_PROMPT,
        DialogueState.THANKS,
    }
)

#: Which method takes the answer to the command sent in each state (a 511 or a refused
#: command is handled before, the same way in every state).
_ON_RESPONSE: Mapping[DialogueState, str] = MappingProxyType(
    {
        DialogueState.ANSWERING: "_answered",
        DialogueState.MENU: "_menu_answered",
        DialogueState.HINT: "_hint_played",
        DialogueState.GOODBYE: "_last_prompt_played",
        DialogueState.SETTING_VARIABLE: "_variable_set",
        DialogueState.REASON_MENU: "_reason_answered",
        DialogueState.COMMENT_PROMPT: "_comment_prompt_played",
        DialogueState.RECORDING: "_recorded",
        DialogueState.THANKS: "_last_prompt_played",
        DialogueState.CHECKING_CHANNEL: "_channel_checked",
    }
)


# --------------------------------------------------------------------------------------------
# The dialogue


class Dialogue:
    """One caller's rating dialogue (SPEC R2.2–R2.5); pure: no I/O, no clock.

    Call :meth:`start` once, then :meth:`handle` for every event; both return the actions
    to carry out, in order. The last action is a :class:`Finish`, after which only hang-up
    and connection events are accepted (and ignored). Works for FastAGI (``HANGUP`` lines)
    and classic AGI (the adapter turns SIGHUP into :class:`HangupNotice`), and without either
    (AGISIGHUP=no): an ambiguous ``result=-1`` is settled by ``CHANNEL STATUS``.
    """

    def __init__(self, settings: DialogueSettings, call_id: str) -> None:
        self.settings = settings
        self.call_id = call_id
        self._state = DialogueState.NEW
        self._outstanding: str | None = None
        self._attempts = 0
        self._last_failure: Literal["timeout", "invalid"] | None = None
        self._key: str | None = None
        self._level: Level | None = None
        self._reason_codes: list[str] = []
        self._comment_ref: str | None = None
        self._caller_gone = False  # HANGUP, SIGHUP, 511 or a confirmed result=-1
        self._line_lost: str | None = None  # nothing can be sent any more
        self._store_failed: str | None = None
        self._not_rated: NotRatedReason | None = None  # decided as soon as it is known
        self._detail: str | None = None
        self._problem: str | None = None
        self._checking: tuple[DialogueState, str] | None = None  # what a -1 would mean
        self._outcome: Outcome | None = None

    @property
    def state(self) -> DialogueState:
        return self._state

    @property
    def outcome(self) -> Outcome | None:
        """The outcome, once :class:`Finish` was emitted."""
        return self._outcome

    @property
    def outstanding(self) -> str | None:
        """The command text sent and not yet answered, if any."""
        return self._outstanding

    # -- entry points ------------------------------------------------------------------------

    def start(self) -> list[Action]:
        """The first actions: ANSWER (if configured) or straight to the rating menu."""
        if self._state is not DialogueState.NEW:
            raise IllegalDialogueEvent(self._state, "start()", "start() may be called once")
        if self.settings.answer_first:
            return self._send(DialogueState.ANSWERING, "ANSWER")
        return self._menu()

    def handle(self, event: Event) -> list[Action]:
        """Take one event; return the actions it calls for."""
        state = self._state
        if type(event) not in ALLOWED_EVENTS[state]:
            allowed = ", ".join(sorted(kind.__name__ for kind in ALLOWED_EVENTS[state]))
            why = "call start() first" if state is DialogueState.NEW else f"it accepts only {allowed}"
            raise IllegalDialogueEvent(state, event, why)
        if state is DialogueState.FINISHED:
            return []
        if isinstance(event, HangupNotice):
            self._caller_gone = True  # no prompt after this; a pending answer still counts
            return []
        if isinstance(event, PeerStalled | ConnectionLost):
            return self._lose_line(event)
        if isinstance(event, RatingStored | StoreFailed):
            return self._stored(event)
        assert isinstance(event, CommandResponse)
        if event.command.text != self._outstanding:
            raise IllegalDialogueEvent(
                state,
                event,
                f"it answers {event.command.text!r}, but {self._outstanding!r} is outstanding",
            )
        self._outstanding = None
        return self._respond(state, event.response)

    # -- responses ---------------------------------------------------------------------------

    def _respond(self, state: DialogueState, response: Response) -> list[Action]:
        if response.dead_channel:  # 511: the channel is gone (SPEC R2.4)
            self._caller_gone = True
            return self._end()
        if not response.ok:
            return self._refused(state, response)
        if response.failed and state in _PROMPT_STATES:
            # result=-1: a hang-up, or a missing prompt file (fixture h).
            return self._end() if self._caller_gone else self._check_channel(state)
        return getattr(self, _ON_RESPONSE[state])(response)

    def _answered(self, response: Response) -> list[Action]:
        return self._end() if self._caller_gone else self._menu()

    def _hint_played(self, response: Response) -> list[Action]:
        if self._key_in(response) is not None:  # barge-in on the hint (R2.2): the next attempt's key,
            self._attempts += 1  # kept even if the caller hung up right after (R2.4)
            return self._menu_answered(response)
        return self._end() if self._caller_gone else self._menu()

    def _last_prompt_played(self, response: Response) -> list[Action]:
        return self._end()

    def _variable_set(self, response: Response) -> list[Action]:
        return self._after_variable()

    def _comment_prompt_played(self, response: Response) -> list[Action]:
        if self._caller_gone or self._key_in(response) == SKIP_KEY:
            return self._thanks()
        return self._record()

    def _menu_answered(self, response: Response) -> list[Action]:
        try:
            key = key_from_result(response)
        except AGIProtocolError as exc:
            return self._error(f"unexpected answer to the rating menu: {exc}")
        level = self.settings.key_map.level_for(key) if key is not None else None
        if key is not None and level is not None:
            self._key, self._level = key, level
            self._state = DialogueState.STORING
            return [StoreRating(level=level, key=key, attempts=self._attempts)]
        self._last_failure = "timeout" if key is None else "invalid"
        if self._caller_gone:
            return self._end()
        if self._attempts >= self.settings.max_attempts:
            self._not_rated = self._last_failure  # SPEC R2.3: end politely, not rated
            self._detail = f"{self._attempts} attempts, the last one {self._last_failure}"
            return self._play(DialogueState.GOODBYE, PROMPT_GOODBYE)
        hint = PROMPT_TIMEOUT if key is None else PROMPT_INVALID
        return self._play(DialogueState.HINT, hint, escape_digits=ALL_KEYS)

    def _stored(self, event: RatingStored | StoreFailed) -> list[Action]:
        """The store answered: hand the level to the dialplan, then go on (or end politely).

        ``HCP_RATING`` is the *stored* level (docs/asterisk.md), so it is set only after
        :class:`RatingStored`, and even after a hang-up: SET VARIABLE still works on a dead
        channel (fixture e). After :class:`StoreFailed` it stays empty and the goodbye prompt
        is played instead of the thank-you, since nothing was recorded.
        """
        if isinstance(event, StoreFailed):
            self._store_failed = event.reason
            self._not_rated = "error"
            self._detail = f"store failed: {event.reason}"
            self._problem = self._detail
            if self._line_lost:
                return self._end()
            return self._play(DialogueState.GOODBYE, PROMPT_GOODBYE)
        if self._line_lost:
            return self._end()
        assert self._level is not None
        return self._send(DialogueState.SETTING_VARIABLE, _set_variable_text(RATING_VARIABLE, str(int(self._level))))

    def _after_variable(self) -> list[Action]:
        if self._caller_gone:
            return self._end()
        assert self._level is not None
        if self._level.is_bad and self.settings.reason_menu:
            reason_digits = "".join(self.settings.reason_keys) + SKIP_KEY
            text = _get_option_text(self.settings.prompt(PROMPT_REASON_MENU), reason_digits, self.settings.wait_ms)
            return self._send(DialogueState.REASON_MENU, text)
        return self._after_reason()

    def _reason_answered(self, response: Response) -> list[Action]:
        actions: list[Action] = []
        reason = self.settings.reason_keys.get(self._key_in(response) or SKIP_KEY)
        if reason is not None:
            self._reason_codes.append(reason)
            actions.append(StoreDetail(reason=reason))
        return actions + self._after_reason()

    def _after_reason(self) -> list[Action]:
        assert self._level is not None
        if self._caller_gone:
            return self._end()
        if self._level.is_bad and self.settings.voice_comment:
            return self._play(DialogueState.COMMENT_PROMPT, PROMPT_COMMENT, SKIP_KEY)
        return self._thanks()

    def _record(self) -> list[Action]:
        settings = self.settings
        text = record_file(
            settings.comment_path(self.call_id),
            settings.comment_format,
            SKIP_KEY,
            settings.comment_max_s * 1000,
            beep=True,
            silence_s=settings.comment_silence_s,
        ).text
        return self._send(DialogueState.RECORDING, text)

    def _recorded(self, response: Response) -> list[Action]:
        """RECORD FILE's answer: a key or the time limit ends it; ``(hangup)`` keeps the file.

        ``endpos`` 0 means nothing was recorded (Asterisk trims the final silence), which
        counts as skipping (SPEC R2.5). What the caller said before hanging up is kept.
        """
        actions: list[Action] = []
        hung_up = response.failed and response.data == "hangup"
        if (response.result_int or 0) >= 0 or hung_up:
            if response.endpos:
                self._comment_ref = self.settings.comment_path(self.call_id)
                actions.append(StoreDetail(comment_ref=self._comment_ref))
            if hung_up:
                self._caller_gone = True
            return actions + (self._end() if self._caller_gone else self._thanks())
        if self._caller_gone:
            return self._end()
        return self._check_channel(DialogueState.RECORDING, f"recording failed: RECORD FILE gave ({response.data})")

    def _channel_checked(self, response: Response) -> list[Action]:
        assert self._checking is not None
        failed_state, what = self._checking
        self._checking = None
        status = response.result_int
        if self._caller_gone or status is None or status < 2:  # -1 no channel, 0/1 down
            self._caller_gone = True
            return self._end()
        # The channel is up, so the -1 was not a hang-up: continuing politely is impossible,
        # except after a failed recording, where the thank-you prompt still exists.
        if failed_state is DialogueState.RECORDING:
            self._problem = what
            return self._thanks()
        return self._error(what)

    def _refused(self, state: DialogueState, response: Response) -> list[Action]:
        """Asterisk answered 510/520/…: our command is wrong for it; end, keeping any rating."""
        message = response.message.split(".")[0]
        return self._error(f"Asterisk refused the {state.value} command: {response.code} {message}")

    # -- commands ----------------------------------------------------------------------------

    def _send(self, state: DialogueState, text: str) -> list[Action]:
        self._state = state
        self._outstanding = text
        return [SendCommand(text)]

    def _menu(self) -> list[Action]:
        self._attempts += 1
        settings = self.settings
        text = _get_option_text(settings.prompt(PROMPT_MENU), ALL_KEYS, settings.wait_ms)
        return self._send(DialogueState.MENU, text)

    def _play(self, state: DialogueState, name: str, escape_digits: str = "") -> list[Action]:
        if self._caller_gone:  # no prompt after a hang-up (SPEC R2.4)
            return self._end()
        return self._send(state, _stream_file_text(self.settings.prompt(name), escape_digits))

    def _thanks(self) -> list[Action]:
        name = PROMPT_COMMENT_THANKS if self._comment_ref else PROMPT_THANKS
        return self._play(DialogueState.THANKS, name)

    def _check_channel(self, state: DialogueState, problem: str | None = None) -> list[Action]:
        """Ask whether the channel is up, to tell a hang-up from ``problem`` (fixture h)."""
        if problem is None:
            problem = self._problem_if_up(state)
        self._checking = (state, problem)
        return self._send(DialogueState.CHECKING_CHANNEL, channel_status().text)

    def _problem_if_up(self, state: DialogueState) -> str:
        if state is DialogueState.ANSWERING:
            return "ANSWER gave result=-1 although the channel is up"
        prompt = {
            DialogueState.MENU: self.settings.prompt(PROMPT_MENU),
            DialogueState.HINT: self.settings.prompt(
                PROMPT_TIMEOUT if self._last_failure == "timeout" else PROMPT_INVALID
            ),
            DialogueState.GOODBYE: self.settings.prompt(PROMPT_GOODBYE),
            DialogueState.REASON_MENU: self.settings.prompt(PROMPT_REASON_MENU),
            DialogueState.COMMENT_PROMPT: self.settings.prompt(PROMPT_COMMENT),
            DialogueState.THANKS: self.settings.prompt(PROMPT_COMMENT_THANKS if self._comment_ref else PROMPT_THANKS),
        }
        return f"prompt missing: {prompt.get(state, state.value)}"

    @staticmethod
    def _key_in(response: Response) -> str | None:
        try:
            return key_from_result(response)
        except AGIResponseError:
            return None

    # -- endings -----------------------------------------------------------------------------

    def _lose_line(self, event: PeerStalled | ConnectionLost) -> list[Action]:
        if isinstance(event, PeerStalled):
            what = self._outstanding or "the last command"
            self._line_lost = f"Asterisk did not answer {what!r} in time"
            reason: NotRatedReason = "error"
        elif event.problem is not None:
            self._line_lost = event.problem
            reason = "error"
        else:
            self._line_lost = "the AGI connection was lost"
            reason = "hangup"
        self._outstanding = None
        if self._not_rated is None:
            self._not_rated = reason
            self._detail = self._line_lost
        if self._state is DialogueState.STORING:
            return []  # the rating is being stored: finish when the store answers (R2.4)
        return self._end()

    def _error(self, problem: str) -> list[Action]:
        self._problem = problem
        if self._not_rated is None:
            self._not_rated = "error"
            self._detail = problem
        return self._end()

    def _end(self) -> list[Action]:
        outcome: Outcome
        if self._key is not None and self._level is not None and self._store_failed is None:
            outcome = Rated(
                level=self._level,
                key=self._key,
                attempts=self._attempts,
                reason_codes=tuple(self._reason_codes),
                comment_ref=self._comment_ref,
            )
        else:
            if self._not_rated is None:
                self._not_rated = "hangup"  # the only way to end early without a decision
                self._detail = "the caller hung up"
            outcome = NotRated(reason=self._not_rated, attempts=self._attempts, detail=self._detail)
        self._state = DialogueState.FINISHED
        self._outstanding = None
        self._outcome = outcome
        return [Finish(outcome, problem=self._problem)]
