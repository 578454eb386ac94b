"""The voice rating dialogue (gateway.ivr.dialogue, SPEC R2.2–R2.5), fed Asterisk's real lines.

Each test drives a :class:`Dialogue` through an :class:`AGIConnection`, the way the FastAGI
adapter will: the dialogue's commands go through ``send_command``, and Asterisk's answers are
fed as the lines of the transcripts in ``fixtures/agi`` (named in each test).
"""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.ivr.agi import (
    AGICommand,
    AGIConnection,
    CommandResponse,
    ConnectionClosed,
    EnvironmentReady,
    HangupNotice,
    ProtocolError,
    parse_response,
)
from gateway.ivr.dialogue import (
    ALLOWED_EVENTS,
    Action,
    ConnectionLost,
    Dialogue,
    DialogueSettings,
    DialogueState,
    Finish,
    IllegalDialogueEvent,
    NotRated,
    PeerStalled,
    Rated,
    RatingStored,
    SendCommand,
    StoreDetail,
    StoreFailed,
    StoreRating,
    safe_call_id,
)
from gateway.rating import KeyMap, Level

CALL_ID = "1795370432.48"
ENVIRONMENT = (
    b"agi_network: yes\n"
    b"agi_network_script: rating?call_id=1795370432.48\n"
    b"agi_request: agi://127.0.0.1:4573/rating?call_id=1795370432.48\n"
    b"agi_channel: Local/s@caller-sim-00000018;1\n"
    b"agi_language: zh\n"
    b"agi_uniqueid: 1795370432.48\n"
    b"agi_callerid: 13800138000\n"
    b"\n"
)

ANSWER = "ANSWER"
MENU = 'GET OPTION hcp/hcp-rating-menu "0123456789*#" 5000'
INVALID_HINT = 'STREAM FILE hcp/hcp-rating-invalid "0123456789*#"'
TIMEOUT_HINT = 'STREAM FILE hcp/hcp-rating-timeout "0123456789*#"'
THANKS = 'STREAM FILE hcp/hcp-rating-thanks ""'
GOODBYE = 'STREAM FILE hcp/hcp-rating-goodbye ""'
REASON_MENU = 'GET OPTION hcp/hcp-rating-reason-menu "1234#" 5000'
COMMENT = 'STREAM FILE hcp/hcp-rating-comment "#"'
COMMENT_THANKS = 'STREAM FILE hcp/hcp-rating-comment-thanks ""'
COMMENT_PATH = "/var/spool/asterisk/hcp-comments/1795370432.48"
RECORD = f'RECORD FILE {COMMENT_PATH} wav "#" 60000 0 BEEP s=3'
STATUS = "CHANNEL STATUS"
DEAD = "511 Command Not Permitted on a dead channel or intercept routine"
PLAYED_OUT = "200 result=0 endpos=3404"


def set_rating(level: Level) -> str:
    return f'SET VARIABLE HCP_RATING "{int(level)}"'


class Call:
    """The adapter in miniature: an AGIConnection between Asterisk's lines and the dialogue."""

    def __init__(self, settings: DialogueSettings | None = None, call_id: str = CALL_ID) -> None:
        self.conn = AGIConnection()
        self.conn.receive_data(ENVIRONMENT)
        assert isinstance(self.conn.next_event(), EnvironmentReady)
        self.dialogue = Dialogue(settings or DialogueSettings(), call_id)
        self.sent: list[str] = []
        self.actions: list[Action] = []
        self.last = self._carry_out(self.dialogue.start())

    def _carry_out(self, actions: list[Action]) -> list[Action]:
        for action in actions:
            if isinstance(action, SendCommand):
                self.conn.send_command(action.text)
                self.sent.append(action.text)
        self.actions.extend(actions)
        return actions

    @property
    def waiting_for(self) -> str | None:
        return self.dialogue.outstanding

    def asterisk(self, *lines: str) -> list[Action]:
        """Asterisk writes these lines; return the dialogue's actions."""
        actions: list[Action] = []
        for line in lines:
            self.conn.receive_line(line)
            for event in self.conn.events():
                if isinstance(event, ConnectionClosed | ProtocolError):
                    actions += self._carry_out(self.dialogue.handle(ConnectionLost()))
                else:
                    actions += self._carry_out(self.dialogue.handle(event))
        self.last = actions
        return actions

    def eof(self) -> list[Action]:
        self.conn.receive_data(b"")
        actions: list[Action] = []
        for event in self.conn.events():
            assert isinstance(event, ConnectionClosed)
            actions += self._carry_out(self.dialogue.handle(ConnectionLost()))
        self.last = actions
        return actions

    def event(self, event: object) -> list[Action]:
        """An event from the adapter itself (store, timers, SIGHUP)."""
        self.last = self._carry_out(self.dialogue.handle(event))  # type: ignore[arg-type]
        return self.last

    @property
    def finish(self) -> Finish:
        finishes = [a for a in self.actions if isinstance(a, Finish)]
        assert len(finishes) == 1, self.actions
        assert self.actions[-1] is finishes[0]
        assert self.dialogue.state is DialogueState.FINISHED
        return finishes[0]

    @property
    def stores(self) -> list[StoreRating]:
        return [a for a in self.actions if isinstance(a, StoreRating)]

    @property
    def details(self) -> list[StoreDetail]:
        return [a for a in self.actions if isinstance(a, StoreDetail)]


def sends(actions: list[Action]) -> list[str]:
    return [a.text for a in actions if isinstance(a, SendCommand)]


def rated_through_menu(call: Call, key_line: str) -> None:
    assert call.sent == [ANSWER]
    assert sends(call.asterisk("200 result=0")) == [MENU]
    call.asterisk(key_line)


# --------------------------------------------------------------------------------------------
# Rating (SPEC R2.2)


def test_key_during_prompt_is_rated_after_store_confirms():
    """Fixture a: key 2 interrupts the prompt (``result=50``); 2 = 满意 on the default map."""
    call = Call()
    rated_through_menu(call, "200 result=50 endpos=13600")
    assert call.last == [StoreRating(level=Level.SATISFIED, key="2", attempts=1)]
    assert call.waiting_for is None
    assert sends(call.event(RatingStored())) == [set_rating(Level.SATISFIED)]
    assert sends(call.asterisk("200 result=1")) == [THANKS]
    assert call.asterisk("200 result=0 endpos=16000") == [Finish(Rated(level=Level.SATISFIED, key="2", attempts=1))]
    assert call.sent == [ANSWER, MENU, set_rating(Level.SATISFIED), THANKS]


def test_key_after_the_prompt_within_the_wait_is_rated():
    """Fixture r: GET OPTION waits after the prompt; key 3 comes back as ``result=51``."""
    call = Call()
    rated_through_menu(call, "200 result=51 endpos=3404")
    assert call.stores == [StoreRating(Level.BASICALLY_SATISFIED, "3", 1)]


def test_menu_plays_and_waits_in_one_command_with_every_key_as_escape_digit():
    """Fixtures d2 and q: an invalid key must interrupt, and no gap may swallow a key."""
    call = Call()
    call.asterisk("200 result=0")
    assert call.sent[-1] == MENU


def test_no_thanks_before_rating_stored():
    """SPEC R2.2: nothing is sent after the key until the store confirms."""
    call = Call()
    rated_through_menu(call, "200 result=52 endpos=13600")
    assert sends(call.last) == []
    assert call.dialogue.state is DialogueState.STORING
    with pytest.raises(IllegalDialogueEvent):
        call.dialogue.handle(CommandResponse(AGICommand(THANKS), parse_response(PLAYED_OUT)))
    assert call.event(PeerStalled()) == []  # the adapter's timer fires: still waiting
    assert call.dialogue.state is DialogueState.STORING
    assert call.event(RatingStored()) == [Finish(Rated(Level.DISSATISFIED, "4", 1))]
    assert THANKS not in call.sent


def test_answer_first_can_be_switched_off():
    call = Call(DialogueSettings(answer_first=False))
    assert call.sent == [MENU]


def test_configured_key_map_decides_the_level():
    """SPEC R1.2: keys are mapped explicitly, never passed through."""
    reversed_map = KeyMap.from_config({"1": 1, "2": 2, "3": 3, "4": 4, "5": 5})
    call = Call(DialogueSettings(key_map=reversed_map))
    rated_through_menu(call, "200 result=49")
    assert call.stores == [StoreRating(Level.VERY_DISSATISFIED, "1", 1)]


def test_prompt_dir_and_wait_are_configurable():
    call = Call(DialogueSettings(prompt_dir="zh/hcp/", wait_ms=8000))
    call.asterisk("200 result=0")
    assert call.sent[-1] == 'GET OPTION zh/hcp/hcp-rating-menu "0123456789*#" 8000'


# --------------------------------------------------------------------------------------------
# Bad input (SPEC R2.3)


def test_invalid_then_valid():
    """Fixture d: 9 (``result=57``) is not a rating; a hint, the menu again, then 3."""
    call = Call()
    rated_through_menu(call, "200 result=57 endpos=12000")
    assert sends(call.last) == [INVALID_HINT]
    assert sends(call.asterisk("200 result=0 endpos=8000")) == [MENU]
    call.asterisk("200 result=51")
    assert call.stores == [StoreRating(Level.BASICALLY_SATISFIED, "3", 2)]
    call.event(RatingStored())
    call.asterisk("200 result=1")
    call.asterisk(PLAYED_OUT)
    assert call.finish.outcome == Rated(Level.BASICALLY_SATISFIED, "3", 2)


def test_a_key_pressed_during_the_hint_answers_the_menu():
    """SPEC R2.2 barge-in on the hint too: the caller who knows the answer need not hear the menu again."""
    call = Call()
    rated_through_menu(call, "200 result=57 endpos=12000")
    assert sends(call.last) == [INVALID_HINT]
    call.asterisk("200 result=52 endpos=1200")  # 4 during the hint
    assert call.stores == [StoreRating(Level.DISSATISFIED, "4", 2)]
    assert MENU not in call.sent[call.sent.index(INVALID_HINT) :]


def test_a_wrong_key_during_the_hints_counts_as_an_attempt():
    call = Call()
    call.asterisk("200 result=0")
    assert sends(call.asterisk("200 result=57 endpos=100")) == [INVALID_HINT]  # attempt 1: 9
    assert sends(call.asterisk("200 result=35 endpos=100")) == [INVALID_HINT]  # attempt 2: # during the hint
    assert sends(call.asterisk("200 result=48 endpos=100")) == [GOODBYE]  # attempt 3: 0 during the hint
    call.asterisk(PLAYED_OUT)
    assert call.finish.outcome == NotRated(reason="invalid", attempts=3, detail="3 attempts, the last one invalid")
    assert call.sent.count(MENU) == 1


@pytest.mark.parametrize("line", ["200 result=48", "200 result=54", "200 result=42", "200 result=35"])
def test_every_invalid_key_gets_the_invalid_hint(line):
    """0, 6–9, * and # are invalid on the default menu."""
    call = Call()
    rated_through_menu(call, line)
    assert sends(call.last) == [INVALID_HINT]


def test_timeout_then_valid():
    """Fixture c: GET OPTION without a key answers ``result=0 endpos=3404``."""
    call = Call()
    rated_through_menu(call, PLAYED_OUT)
    assert sends(call.last) == [TIMEOUT_HINT]
    assert sends(call.asterisk(PLAYED_OUT)) == [MENU]
    call.asterisk("200 result=49 endpos=100")
    assert call.stores == [StoreRating(Level.VERY_SATISFIED, "1", 2)]


def test_three_timeouts_end_politely_not_rated():
    call = Call()
    call.asterisk("200 result=0")
    for _ in range(2):
        assert sends(call.asterisk(PLAYED_OUT)) == [TIMEOUT_HINT]
        assert sends(call.asterisk(PLAYED_OUT)) == [MENU]
    assert sends(call.asterisk(PLAYED_OUT)) == [GOODBYE]
    call.asterisk(PLAYED_OUT)
    assert call.finish.outcome == NotRated(reason="timeout", attempts=3, detail="3 attempts, the last one timeout")
    assert call.stores == []
    assert call.sent.count(MENU) == 3


def test_three_invalid_keys_end_not_rated_invalid():
    call = Call()
    call.asterisk("200 result=0")
    for _ in range(2):
        assert sends(call.asterisk("200 result=57 endpos=100")) == [INVALID_HINT]
        call.asterisk(PLAYED_OUT)
    assert sends(call.asterisk("200 result=48 endpos=100")) == [GOODBYE]
    call.asterisk(PLAYED_OUT)
    assert call.finish.outcome.reason == "invalid"  # type: ignore[union-attr]


def test_not_rated_reason_is_the_last_failure():
    call = Call()
    call.asterisk("200 result=0")
    call.asterisk("200 result=57 endpos=100")
    call.asterisk(PLAYED_OUT)
    call.asterisk("200 result=42 endpos=100")
    call.asterisk(PLAYED_OUT)
    call.asterisk(PLAYED_OUT)  # the third attempt times out
    call.asterisk(PLAYED_OUT)  # goodbye
    assert call.finish.outcome.reason == "timeout"  # type: ignore[union-attr]


def test_max_attempts_is_configurable():
    call = Call(DialogueSettings(max_attempts=1))
    call.asterisk("200 result=0")
    assert sends(call.asterisk(PLAYED_OUT)) == [GOODBYE]
    call.asterisk(PLAYED_OUT)
    assert call.finish.outcome == NotRated("timeout", 1, "1 attempts, the last one timeout")


def test_hang_up_during_goodbye_keeps_the_failure_reason():
    call = Call(DialogueSettings(max_attempts=1))
    call.asterisk("200 result=0", PLAYED_OUT)
    assert sends(call.asterisk("200 result=-1 endpos=800")) == [STATUS]
    call.asterisk(DEAD)
    assert call.finish.outcome.reason == "timeout"  # type: ignore[union-attr]


# --------------------------------------------------------------------------------------------
# Hang-up (SPEC R2.4)


def test_hangup_during_prompt_not_rated():
    """Fixture e: ``result=-1 endpos=16000``, then Asterisk's HANGUP line, then 511."""
    call = Call()
    rated_through_menu(call, "200 result=-1 endpos=16000")
    assert sends(call.last) == [STATUS]  # -1 alone is ambiguous (fixture h)
    assert call.asterisk("HANGUP") == []
    call.asterisk(DEAD)
    assert call.finish.outcome == NotRated("hangup", 1, "the caller hung up")
    assert call.stores == []


def test_hangup_without_sighup_is_found_by_channel_status():
    """Fixture e2 (AGISIGHUP=no, as our dialplan sets it): no HANGUP line at all."""
    call = Call()
    rated_through_menu(call, "200 result=-1 endpos=16000")
    call.asterisk(DEAD)
    assert call.finish.outcome == NotRated("hangup", 1, "the caller hung up")


def test_hangup_notice_before_the_answer_needs_no_channel_check():
    call = Call()
    call.asterisk("200 result=0")
    call.asterisk("HANGUP", "200 result=-1 endpos=16000")
    assert STATUS not in call.sent
    assert call.finish.outcome == NotRated("hangup", 1, "the caller hung up")


def test_hangup_during_wait():
    """Fixture f: ``200 result=-1`` (no endpos), HANGUP, then 511 for channel commands."""
    call = Call()
    rated_through_menu(call, "200 result=-1")
    call.asterisk("HANGUP", DEAD)
    assert call.finish.outcome == NotRated("hangup", 1, "the caller hung up")


def test_hangup_during_the_hint_not_rated_with_attempts():
    call = Call()
    rated_through_menu(call, "200 result=57 endpos=100")
    call.asterisk("200 result=-1 endpos=400", "HANGUP", DEAD)
    assert call.finish.outcome == NotRated("hangup", 1, "the caller hung up")


def test_hangup_before_answer():
    call = Call()
    call.asterisk(DEAD)
    assert call.finish.outcome == NotRated("hangup", 0, "the caller hung up")


def test_asterisk_closing_the_socket_ends_not_rated():
    """Fixture e3 (AGIEXITONHANGUP=yes): -1, HANGUP, HANGUP, then EOF."""
    call = Call()
    rated_through_menu(call, "200 result=-1 endpos=16000")
    call.asterisk("HANGUP", "HANGUP")
    call.eof()
    assert call.finish.outcome == NotRated("hangup", 1, "the AGI connection was lost")


def test_classic_agi_sighup_arrives_as_hangup_notice():
    """Fixture m2: classic AGI gets SIGHUP, which the adapter turns into HangupNotice."""
    call = Call()
    rated_through_menu(call, "200 result=-1 endpos=11040")
    call.event(HangupNotice())
    call.asterisk(DEAD)
    assert call.finish.outcome.reason == "hangup"  # type: ignore[union-attr]


def test_key_then_hangup_is_still_stored():
    """Fixture n: key 4 arrives, the caller hangs up, HANGUP lands between SET and its answer."""
    call = Call(DialogueSettings(reason_menu=True, voice_comment=True))
    rated_through_menu(call, "200 result=52 endpos=13600")
    assert call.last == [StoreRating(Level.DISSATISFIED, "4", 1)]
    assert sends(call.event(RatingStored())) == [set_rating(Level.DISSATISFIED)]
    assert call.asterisk("HANGUP") == []
    assert call.asterisk("200 result=1") == [Finish(Rated(Level.DISSATISFIED, "4", 1))]
    assert REASON_MENU not in call.sent and THANKS not in call.sent


def test_key_then_hangup_during_thanks_is_rated():
    call = Call()
    rated_through_menu(call, "200 result=53 endpos=100")
    call.event(RatingStored())
    call.asterisk("200 result=1")
    assert sends(call.asterisk("200 result=-1 endpos=2080")) == [STATUS]
    call.asterisk(DEAD)
    assert call.finish == Finish(Rated(Level.VERY_DISSATISFIED, "5", 1))


def test_hangup_while_storing_still_sets_the_variable_then_finishes():
    """A key received before hang-up is never lost (R2.4): stored, and handed to the dialplan."""
    call = Call()
    rated_through_menu(call, "200 result=50 endpos=100")
    assert call.event(HangupNotice()) == []
    assert sends(call.event(RatingStored())) == [set_rating(Level.SATISFIED)]
    call.asterisk("200 result=1")  # SET VARIABLE answers 200 on a dead channel (fixture e)
    assert call.finish.outcome == Rated(Level.SATISFIED, "2", 1)
    assert THANKS not in call.sent


def test_key_reported_after_the_hangup_notice_still_counts():
    """The key was pressed before the hang-up; its answer just came after the HANGUP line."""
    call = Call()
    call.asterisk("200 result=0")
    call.asterisk("HANGUP", "200 result=49 endpos=100")
    assert call.stores == [StoreRating(Level.VERY_SATISFIED, "1", 1)]
    call.event(RatingStored())
    call.asterisk("200 result=1")
    assert call.finish.outcome == Rated(Level.VERY_SATISFIED, "1", 1)


def test_connection_lost_while_storing_waits_for_the_store():
    call = Call()
    rated_through_menu(call, "200 result=50 endpos=100")
    assert call.eof() == []
    assert call.event(RatingStored()) == [Finish(Rated(Level.SATISFIED, "2", 1))]
    assert set_rating(Level.SATISFIED) not in call.sent


def test_peer_stall_before_a_key_is_an_error():
    call = Call()
    call.asterisk("200 result=0")
    call.event(PeerStalled())
    outcome = call.finish.outcome
    assert isinstance(outcome, NotRated) and outcome.reason == "error"
    assert "did not answer" in (outcome.detail or "")


def test_peer_stall_after_a_key_is_still_rated():
    call = Call()
    rated_through_menu(call, "200 result=50 endpos=100")
    call.event(RatingStored())
    call.event(PeerStalled())  # SET VARIABLE never answered
    assert call.finish.outcome == Rated(Level.SATISFIED, "2", 1)


def test_events_after_finish_are_ignored():
    """Asterisk sends HANGUP after the half-close (fixture b); the socket then closes."""
    call = Call()
    call.asterisk(DEAD)
    assert call.event(HangupNotice()) == []
    assert call.event(ConnectionLost()) == []
    assert call.event(PeerStalled()) == []


# --------------------------------------------------------------------------------------------
# Missing prompts and refused commands


def test_missing_prompt_is_error_not_hangup():
    """Fixture h: a missing file also gives ``result=-1 endpos=0``, but CHANNEL STATUS is 6."""
    call = Call()
    rated_through_menu(call, "200 result=-1 endpos=0")
    assert sends(call.last) == [STATUS]
    call.asterisk("200 result=6")
    assert call.finish == Finish(
        NotRated("error", 1, "prompt missing: hcp/hcp-rating-menu"),
        problem="prompt missing: hcp/hcp-rating-menu",
    )


def test_missing_hint_prompt_is_named():
    call = Call()
    rated_through_menu(call, PLAYED_OUT)
    call.asterisk("200 result=-1 endpos=0", "200 result=6")
    assert call.finish.outcome == NotRated("error", 1, "prompt missing: hcp/hcp-rating-timeout")


def test_missing_thanks_prompt_is_still_rated_with_a_problem():
    call = Call()
    rated_through_menu(call, "200 result=50 endpos=100")
    call.event(RatingStored())
    call.asterisk("200 result=1", "200 result=-1 endpos=0", "200 result=6")
    assert call.finish == Finish(Rated(Level.SATISFIED, "2", 1), problem="prompt missing: hcp/hcp-rating-thanks")


def test_refused_command_is_an_error():
    call = Call()
    rated_through_menu(call, "510 Invalid or unknown command")
    outcome = call.finish.outcome
    assert isinstance(outcome, NotRated) and outcome.reason == "error"
    assert "510" in (outcome.detail or "")


def test_store_failure_is_an_error_with_goodbye_not_thanks():
    call = Call()
    rated_through_menu(call, "200 result=50 endpos=100")
    assert sends(call.event(StoreFailed("database is locked"))) == [GOODBYE]
    call.asterisk(PLAYED_OUT)
    assert call.finish == Finish(
        NotRated("error", 1, "store failed: database is locked"),
        problem="store failed: database is locked",
    )
    assert not any(text.startswith("SET VARIABLE") for text in call.sent)


# --------------------------------------------------------------------------------------------
# Bad-rating detail (SPEC R2.5)


def test_reason_menu_after_bad_rating():
    call = Call(DialogueSettings(reason_menu=True))
    rated_through_menu(call, "200 result=53 endpos=100")
    call.event(RatingStored())
    assert sends(call.asterisk("200 result=1")) == [REASON_MENU]
    assert call.asterisk("200 result=50 endpos=4000") == [StoreDetail(reason="efficiency"), SendCommand(THANKS)]
    call.asterisk(PLAYED_OUT)
    assert call.finish.outcome == Rated(Level.VERY_DISSATISFIED, "5", 1, reason_codes=("efficiency",))


@pytest.mark.parametrize("line", ["200 result=35 endpos=100", PLAYED_OUT], ids=["hash", "timeout"])
def test_reason_menu_can_be_skipped(line):
    call = Call(DialogueSettings(reason_menu=True))
    rated_through_menu(call, "200 result=52 endpos=100")
    call.event(RatingStored())
    call.asterisk("200 result=1")
    assert call.asterisk(line) == [SendCommand(THANKS)]
    call.asterisk(PLAYED_OUT)
    assert call.finish.outcome == Rated(Level.DISSATISFIED, "4", 1)
    assert call.details == []


def test_no_reason_menu_after_good_rating():
    call = Call(DialogueSettings(reason_menu=True, voice_comment=True))
    rated_through_menu(call, "200 result=51 endpos=100")
    call.event(RatingStored())
    assert sends(call.asterisk("200 result=1")) == [THANKS]


def test_voice_comment_recorded():
    """Fixture l: RECORD FILE ended by # answers ``200 result=35 (dtmf) endpos=42518``."""
    call = Call(DialogueSettings(voice_comment=True))
    rated_through_menu(call, "200 result=52 endpos=100")
    call.event(RatingStored())
    assert sends(call.asterisk("200 result=1")) == [COMMENT]
    assert sends(call.asterisk("200 result=0 endpos=24000")) == [RECORD]
    assert call.asterisk("200 result=35 (dtmf) endpos=42518") == [
        StoreDetail(comment_ref=COMMENT_PATH),
        SendCommand(COMMENT_THANKS),
    ]
    call.asterisk("200 result=0 endpos=20000")
    assert call.finish.outcome == Rated(Level.DISSATISFIED, "4", 1, comment_ref=COMMENT_PATH)


def test_voice_comment_after_reason():
    call = Call(DialogueSettings(reason_menu=True, voice_comment=True))
    rated_through_menu(call, "200 result=52 endpos=100")
    call.event(RatingStored())
    call.asterisk("200 result=1")
    assert sends(call.asterisk("200 result=49 endpos=100")) == [COMMENT]
    call.asterisk(PLAYED_OUT)
    call.asterisk("200 result=0 (timeout) endpos=80000")
    call.asterisk(PLAYED_OUT)
    assert call.finish.outcome == Rated(
        Level.DISSATISFIED, "4", 1, reason_codes=("attitude",), comment_ref=COMMENT_PATH
    )
    assert call.sent[-1] == COMMENT_THANKS


def test_voice_comment_skipped_with_hash_during_the_prompt():
    call = Call(DialogueSettings(voice_comment=True))
    rated_through_menu(call, "200 result=52 endpos=100")
    call.event(RatingStored())
    call.asterisk("200 result=1")
    assert sends(call.asterisk("200 result=35 endpos=8000")) == [THANKS]
    call.asterisk(PLAYED_OUT)
    assert call.finish.outcome == Rated(Level.DISSATISFIED, "4", 1)


def test_empty_recording_counts_as_skipped():
    """Asterisk trims the final silence: ``endpos=0`` means nothing was said."""
    call = Call(DialogueSettings(voice_comment=True))
    rated_through_menu(call, "200 result=52 endpos=100")
    call.event(RatingStored())
    call.asterisk("200 result=1", PLAYED_OUT)
    assert sends(call.asterisk("200 result=0 (timeout) endpos=0")) == [THANKS]
    assert call.details == []


def test_comment_is_kept_when_the_caller_hangs_up_while_recording():
    call = Call(DialogueSettings(voice_comment=True))
    rated_through_menu(call, "200 result=52 endpos=100")
    call.event(RatingStored())
    call.asterisk("200 result=1", PLAYED_OUT)
    assert call.asterisk("200 result=-1 (hangup) endpos=16000") == [
        StoreDetail(comment_ref=COMMENT_PATH),
        Finish(Rated(Level.DISSATISFIED, "4", 1, comment_ref=COMMENT_PATH)),
    ]


def test_failed_recording_goes_on_to_thanks_with_a_problem():
    call = Call(DialogueSettings(voice_comment=True))
    rated_through_menu(call, "200 result=52 endpos=100")
    call.event(RatingStored())
    call.asterisk("200 result=1", PLAYED_OUT)
    assert sends(call.asterisk("200 result=-1 (writefile)")) == [STATUS]
    assert sends(call.asterisk("200 result=6")) == [THANKS]
    call.asterisk(PLAYED_OUT)
    assert call.finish == Finish(
        Rated(Level.DISSATISFIED, "4", 1), problem="recording failed: RECORD FILE gave (writefile)"
    )


@pytest.mark.parametrize(
    ("call_id", "safe"),
    [
        ("1795370432.48", "1795370432.48"),
        ("../../etc/passwd", "_.._etc_passwd"),
        ("..", "unknown"),
        ("", "unknown"),
        ("a b/c\\d", "a_b_c_d"),
        ("评价", "__"),
    ],
)
def test_comment_path_cannot_leave_its_directory(call_id, safe):
    assert safe_call_id(call_id) == safe
    path = DialogueSettings().comment_path(call_id)
    assert path == f"/var/spool/asterisk/hcp-comments/{safe}"
    assert "/.." not in path


def test_comment_settings_reach_record_file():
    settings = DialogueSettings(
        voice_comment=True,
        comment_max_s=30,
        comment_silence_s=None,
        comment_path_template="/srv/comments/hcp-{call_id}",
    )
    call = Call(settings)
    rated_through_menu(call, "200 result=52 endpos=100")
    call.event(RatingStored())
    call.asterisk("200 result=1", PLAYED_OUT)
    assert call.sent[-1] == f'RECORD FILE /srv/comments/hcp-{CALL_ID} wav "#" 30000 0 BEEP'


@pytest.mark.parametrize(
    "changes",
    [
        {"max_attempts": 0},
        {"wait_ms": 0},
        {"reason_keys": {"#": "other"}},
        {"reason_keys": {"12": "other"}},
        {"comment_path_template": "/var/spool/comments"},
        {"comment_silence_s": 0},
    ],
)
def test_invalid_settings_are_refused(changes):
    with pytest.raises(ValueError, match="invalid rating dialogue settings"):
        DialogueSettings(**changes)


# --------------------------------------------------------------------------------------------
# Illegal events


def test_illegal_event_is_named_error():
    call = Call()
    with pytest.raises(IllegalDialogueEvent, match="RatingStored is not allowed in rating dialogue state ANSWERING"):
        call.dialogue.handle(RatingStored())
    assert call.dialogue.state is DialogueState.ANSWERING  # unchanged


def test_events_before_start_are_illegal():
    dialogue = Dialogue(DialogueSettings(), CALL_ID)
    with pytest.raises(IllegalDialogueEvent, match="call start"):
        dialogue.handle(HangupNotice())


def test_start_twice_is_illegal():
    dialogue = Dialogue(DialogueSettings(), CALL_ID)
    dialogue.start()
    with pytest.raises(IllegalDialogueEvent, match="once"):
        dialogue.start()


def test_answer_to_another_command_is_illegal():
    call = Call()
    other = AGIConnection()
    other.receive_data(ENVIRONMENT)
    other.next_event()
    other.send_command("NOOP")
    other.receive_line("200 result=0")
    (response,) = [e for e in other.events() if isinstance(e, CommandResponse)]
    with pytest.raises(IllegalDialogueEvent, match="'ANSWER' is outstanding"):
        call.dialogue.handle(response)


def test_store_answer_after_finish_is_illegal():
    call = Call()
    call.asterisk(DEAD)
    with pytest.raises(IllegalDialogueEvent, match="FINISHED"):
        call.dialogue.handle(RatingStored())


def test_every_state_has_an_entry_in_the_transition_table():
    assert set(ALLOWED_EVENTS) == set(DialogueState)


# --------------------------------------------------------------------------------------------
# Properties

Behaviour = tuple[str, str]  # (kind, key)

keys = st.tuples(st.just("key"), st.sampled_from("0123456789*#"))
behaviours = st.one_of(
    keys,
    keys,  # twice: keys are what callers mostly do, and what reaches the detail menus
    st.tuples(st.sampled_from(["timeout", "hangup", "hangup_sighup", "missing", "lost", "stall"]), st.just("")),
    st.tuples(st.just("notice_then_key"), st.sampled_from("0123456789*#")),
)


RATING_QUESTIONS = (
    "GET OPTION hcp/hcp-rating-menu",
    "STREAM FILE hcp/hcp-rating-invalid",
    "STREAM FILE hcp/hcp-rating-timeout",
)


class FakeAsterisk:
    """Answers each command as the real one does (fixtures a–r), following a caller script."""

    def __init__(self, script: list[Behaviour]) -> None:
        self.script = deque(script)
        self.alive = True
        self.first_menu_key: str | None = None
        self.menu_answers = 0
        self.sighup_lines = False

    def answer(self, command: str) -> list[str | object]:
        """Lines (and adapter events) that follow ``command``."""
        kind, key = self.script.popleft() if self.script else ("timeout", "")
        is_prompt = command.startswith(("STREAM FILE", "GET OPTION", "RECORD FILE"))
        if command.startswith("SET VARIABLE"):
            return ["200 result=1"]
        if not self.alive:
            return [DEAD]
        if kind == "lost":
            return [ConnectionLost()]
        if kind == "stall":
            return [PeerStalled()]
        if kind in ("hangup", "hangup_sighup", "notice_then_key"):
            self.alive = False
            notice: list[str | object] = ["HANGUP"] if kind != "hangup" else []
            if kind == "notice_then_key" and is_prompt:
                return [*notice, self._key(command, key)]
            if is_prompt:
                return ["200 result=-1 endpos=800", *notice]
            return [*notice, DEAD]
        if command == STATUS:
            return ["200 result=6"]
        if command == ANSWER:
            return ["200 result=0"]
        if kind == "missing" and is_prompt:
            return ["200 result=-1 endpos=0"]
        if kind == "key" and is_prompt:
            return [self._key(command, key)]
        if command.startswith("RECORD FILE"):
            return ["200 result=0 (timeout) endpos=8000"]
        return [PLAYED_OUT]

    def _key(self, command: str, key: str) -> str:
        escape = command.split('"')[1] if '"' in command else ""
        if command.startswith("GET OPTION hcp/hcp-rating-menu"):
            self.menu_answers += 1
        # The menu's question: the menu itself, or a hint before it, which a key interrupts (R2.2).
        asks_for_rating = command.startswith(RATING_QUESTIONS)
        if asks_for_rating and key in escape and self.first_menu_key is None and key in "12345":
            self.first_menu_key = key
        if key not in escape:  # swallowed (fixture d2)
            return "200 result=0 endpos=3404"
        if command.startswith("RECORD FILE"):
            return f"200 result={ord(key)} (dtmf) endpos=8000"
        return f"200 result={ord(key)} endpos=800"


@settings(max_examples=400, deadline=None)
@given(
    script=st.lists(behaviours, max_size=25),
    max_attempts=st.integers(min_value=1, max_value=4),
    reason_menu=st.booleans(),
    voice_comment=st.booleans(),
    answer_first=st.booleans(),
    store_ok=st.booleans(),
)
def test_any_caller_ends_the_dialogue_with_at_most_one_rating(
    script, max_attempts, reason_menu, voice_comment, answer_first, store_ok
):
    """Whatever the caller does: a bounded number of commands, then Finish; at most one
    StoreRating, for the first valid key; no prompt after a hang-up is known; no thank-you
    before the store confirms; a stored key always ends Rated (SPEC R2.2–R2.4)."""
    config = DialogueSettings(
        max_attempts=max_attempts, reason_menu=reason_menu, voice_comment=voice_comment, answer_first=answer_first
    )
    asterisk = FakeAsterisk(script)
    conn = AGIConnection()
    conn.receive_data(ENVIRONMENT)
    conn.next_event()
    dialogue = Dialogue(config, CALL_ID)
    bound = 2 * max_attempts + 10

    commands: list[str] = []
    stores: list[StoreRating] = []
    finish: list[Finish] = []
    hangup_known = stored = False
    pending: deque[Action] = deque(dialogue.start())
    while pending:
        action = pending.popleft()
        assert not finish, "nothing may follow Finish"
        if isinstance(action, Finish):
            finish.append(action)
        elif isinstance(action, StoreRating):
            stores.append(action)
            stored = store_ok
            pending.extend(dialogue.handle(RatingStored() if store_ok else StoreFailed("down")))
        elif isinstance(action, SendCommand):
            text = action.text
            commands.append(text)
            assert len(commands) <= bound
            if hangup_known:
                assert not text.startswith(("STREAM FILE", "GET OPTION", "RECORD FILE")), text
            if text in (THANKS, COMMENT_THANKS):
                assert stored
            conn.send_command(text)
            for item in asterisk.answer(text):
                if isinstance(item, str):
                    conn.receive_line(item)
                    events: list[object] = list(conn.events())
                else:
                    events = [item]
                for event in events:
                    if isinstance(event, HangupNotice):
                        hangup_known = True
                    if isinstance(event, CommandResponse) and event.response.dead_channel:
                        hangup_known = True
                    actions = dialogue.handle(event)  # type: ignore[arg-type]
                    # at most one command or Finish per batch, and always last
                    ends = [i for i, a in enumerate(actions) if isinstance(a, SendCommand | Finish)]
                    assert ends in ([], [len(actions) - 1])
                    pending.extend(actions)
    assert len(finish) == 1
    assert dialogue.state is DialogueState.FINISHED
    assert len(stores) <= 1
    if asterisk.first_menu_key is not None:
        assert stores and stores[0].key == asterisk.first_menu_key
        assert stores[0].level == config.key_map.level_for(asterisk.first_menu_key)
    else:
        assert stores == []
    outcome = finish[0].outcome
    if stores and store_ok:
        assert isinstance(outcome, Rated) and outcome.level == stores[0].level
    else:
        assert isinstance(outcome, NotRated)
        assert outcome.attempts <= max_attempts
