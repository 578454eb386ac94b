"""The FastAGI adapter with Twisted's StringTransport and Clock: wire and time in hand, no sockets."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.exc import DataError
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from gateway.ivr.dialogue import DialogueSettings
from gateway.ivr.fastagi import STORE_RETRY_DELAYS, FastAGIFactory, RatingStore
from gateway.rating import Level

ENV = (
    b"agi_network: yes\n"
    b"agi_network_script: rating?call_id=1795370432.48&linked_id=1795370432.40"
    b"&agent=A1024&work_order=GD-1&matter=&queue=q1\n"
    b"agi_request: agi://127.0.0.1:4573/rating?call_id=1795370432.48\n"
    b"agi_channel: Local/s@caller-sim-00000018;1\n"
    b"agi_uniqueid: 1795370432.48\n"
    b"agi_callerid: 13800138000\n"
    b"agi_accountcode: \n"
    b"\n"
)


class FakeWriter:
    """Stands in for the group writer: records each write and lets the test answer it."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, dict[str, Any], defer.Deferred[Any]]] = []
        self.fail_next = 0

    def write(self, name: str, **kwargs: Any) -> defer.Deferred[Any]:
        deferred: defer.Deferred[Any] = defer.Deferred()
        self.writes.append((name, kwargs, deferred))
        if self.fail_next:
            self.fail_next -= 1
            deferred.errback(RuntimeError("database is locked"))
        return deferred

    def names(self) -> list[str]:
        return [name for name, _, _ in self.writes]


class Call:
    def __init__(self, factory: FastAGIFactory) -> None:
        self.protocol = factory.buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def sent(self) -> list[str]:
        lines = self.transport.value().decode().splitlines()
        self.transport.clear()
        return lines

    def answer(self, *lines: str) -> list[str]:
        for line in lines:
            self.send(line.encode() + b"\n")
        return self.sent()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def writer() -> FakeWriter:
    return FakeWriter()


@pytest.fixture
def factory(clock: Clock, writer: FakeWriter) -> FastAGIFactory:
    return FastAGIFactory(DialogueSettings(), RatingStore(writer, clock), clock, idle_timeout=30)  # type: ignore[arg-type]


def start(factory: FastAGIFactory) -> Call:
    call = Call(factory)
    call.send(ENV)
    assert call.sent() == ["ANSWER"]
    assert call.answer("200 result=0") == ['GET OPTION hcp/hcp-rating-menu "0123456789*#" 5000']
    return call


def test_key_during_prompt_is_stored_before_the_thank_you(factory: FastAGIFactory, writer: FakeWriter) -> None:
    """SPEC R2.2: barge-in key 2 (result=50) → 满意 stored, then HCP_RATING, then thanks."""
    call = start(factory)
    assert call.answer("200 result=50 endpos=13600") == []  # nothing played until the store answers
    name, kwargs, deferred = writer.writes[0]
    assert name == "call_rating" and kwargs["level"] is Level.SATISFIED and kwargs["key"] == "2"
    assert kwargs["hand_off"] == {
        "call_id": "1795370432.48",
        "linked_id": "1795370432.40",
        "agent_id": "A1024",
        "work_order": "GD-1",
        "matter_code": None,
        "queue": "q1",
        "caller": "13800138000",
    }
    deferred.callback(("ev-1", True))
    assert call.sent() == ['SET VARIABLE HCP_RATING "4"']
    assert call.answer("200 result=1") == ['STREAM FILE hcp/hcp-rating-thanks ""']
    call.answer("200 result=0 endpos=23280")
    assert call.transport.disconnecting
    assert factory.stats.rated == 1 and factory.stats.active == 1


def test_key_then_hangup_is_still_stored(factory: FastAGIFactory, writer: FakeWriter) -> None:
    """SPEC R2.4, fixture n-key-then-hangup: the key arrives, then the caller is gone."""
    call = start(factory)
    call.answer("200 result=52 endpos=9000")
    call.protocol.connectionLost()
    _, kwargs, deferred = writer.writes[0]
    assert kwargs["level"] is Level.DISSATISFIED
    deferred.callback(("ev-2", True))
    assert factory.stats.rated == 1 and factory.stats.not_rated == 0 and factory.stats.active == 0


def test_hangup_during_prompt_records_the_call_not_rated(factory: FastAGIFactory, writer: FakeWriter) -> None:
    """SPEC R2.3/R2.4, fixture e: result=-1 then HANGUP; CHANNEL STATUS answers 511."""
    call = start(factory)
    assert call.answer("200 result=-1 endpos=6000") == ["CHANNEL STATUS"]
    call.answer("HANGUP", "511 Command Not Permitted on a dead channel or intercept routine")
    assert call.transport.disconnecting
    assert writer.names() == ["unrated_call"] and writer.writes[0][1]["reason"] == "hangup"


def test_three_timeouts_end_politely_and_leave_the_call_for_an_sms(factory: FastAGIFactory, writer: FakeWriter) -> None:
    call = start(factory)
    for _ in range(2):
        assert call.answer("200 result=0 endpos=115840") == ['STREAM FILE hcp/hcp-rating-timeout "0123456789*#"']
        assert call.answer("200 result=0 endpos=22720")[0].startswith("GET OPTION hcp/hcp-rating-menu")
    assert call.answer("200 result=0 endpos=115840") == ['STREAM FILE hcp/hcp-rating-goodbye ""']
    call.answer("200 result=0 endpos=22240")
    assert writer.names() == ["unrated_call"] and writer.writes[0][1]["reason"] == "timeout"


def test_a_failed_store_write_is_retried_before_giving_up(
    factory: FastAGIFactory, writer: FakeWriter, clock: Clock
) -> None:
    """A key pressed is a rating stored: a locked database is retried, not dropped."""
    writer.fail_next = 2
    call = start(factory)
    call.answer("200 result=49 endpos=100")
    clock.advance(STORE_RETRY_DELAYS[0])
    clock.advance(STORE_RETRY_DELAYS[1])
    assert writer.names() == ["call_rating"] * 3
    # Every try carries the same record id; the retries ask the store to look for the first try.
    assert len({kwargs["record_id"] for _, kwargs, _ in writer.writes}) == 1
    assert [kwargs.get("retried", False) for _, kwargs, _ in writer.writes] == [False, True, True]
    writer.writes[-1][2].callback(("ev-3", True))
    assert call.sent() == ['SET VARIABLE HCP_RATING "5"']


def test_a_write_the_database_refuses_for_good_is_not_retried(factory: FastAGIFactory, writer: FakeWriter) -> None:
    """Retrying a value the database refuses only keeps the caller waiting seconds for the same answer."""
    call = start(factory)
    call.answer("200 result=49 endpos=100")
    writer.writes[0][2].errback(DataError("INSERT", {}, Exception("value too long for type character varying(64)")))
    assert writer.names() == ["call_rating"]
    assert factory.stats.store_failures == 1
    assert call.sent()  # the dialogue goes on at once (an apology, then the end)


def test_stalled_peer_is_cut_off_after_the_idle_timeout(
    factory: FastAGIFactory, writer: FakeWriter, clock: Clock
) -> None:
    call = start(factory)
    clock.advance(29)
    assert not call.transport.disconnecting
    clock.advance(2)
    assert call.transport.disconnecting or call.transport.disconnected
    assert writer.names() == ["unrated_call"]


def test_the_idle_timeout_counts_from_the_last_thing_the_peer_sent(
    factory: FastAGIFactory, writer: FakeWriter, clock: Clock
) -> None:
    call = start(factory)
    clock.advance(20)
    assert call.answer("200 result=0 endpos=100") == ['STREAM FILE hcp/hcp-rating-timeout "0123456789*#"']
    clock.advance(29)  # 49 s after the start, 29 s after the answer
    assert not call.transport.disconnecting
    clock.advance(2)
    assert call.transport.disconnecting or call.transport.disconnected
    assert writer.names() == ["unrated_call"]


@pytest.mark.parametrize(
    "garbage",
    [b"garbage from nowhere\n", b"200 result=\xff\xfe endpos=zz\n", b"x" * 20000, b"HANGUPHANGUP\n"],
)
def test_garbled_or_oversized_input_ends_that_call_only(factory: FastAGIFactory, garbage: bytes) -> None:
    broken, healthy = start(factory), start(factory)
    broken.send(garbage)
    assert broken.transport.disconnecting
    assert healthy.answer("200 result=51 endpos=100") == []
    assert not healthy.transport.disconnecting


def test_a_line_that_is_not_agi_records_the_call_as_an_error_not_a_hangup(
    factory: FastAGIFactory, writer: FakeWriter
) -> None:
    """SPEC R2.3: the reason says what ended the call; the caller did not hang up."""
    call = start(factory)
    call.send(b"garbage from nowhere\n")
    assert call.transport.disconnecting
    assert writer.names() == ["unrated_call"] and writer.writes[0][1]["reason"] == "error"


def test_stopping_lets_calls_end_within_the_grace_then_ends_and_records_the_rest(
    factory: FastAGIFactory, writer: FakeWriter, clock: Clock
) -> None:
    """A SIGTERM mid-call: nothing the caller did is lost, and every call is recorded (R2.3, R2.4)."""
    finishing, rating, silent = start(factory), start(factory), start(factory)
    drained = factory.drain(grace=10)  # shorter than the idle timeout (30 s)
    assert not drained.called
    # One call ends on its own within the grace period: its key is stored as usual.
    finishing.answer("200 result=49 endpos=100")
    writer.writes[0][2].callback(("ev-1", True))
    finishing.answer("200 result=1")
    finishing.answer("200 result=0 endpos=100")
    finishing.protocol.connectionLost()
    # Another pressed its key and its rating is being written when the grace runs out.
    rating.answer("200 result=50 endpos=100")
    clock.advance(10)
    assert silent.transport.disconnecting  # ended by the gateway, recorded as not rated
    assert [(name, kwargs.get("reason")) for name, kwargs, _ in writer.writes[2:]] == [("unrated_call", "error")]
    assert not rating.transport.disconnecting  # waits for its rating's write (R2.4)
    writer.writes[1][2].callback(("ev-2", True))
    assert rating.transport.disconnecting
    for call in (rating, silent):
        call.protocol.connectionLost()
    assert drained.called
    assert factory.stats.rated == 2 and factory.stats.not_rated == 1 and factory.stats.active == 0
    assert factory.drain(grace=30).called  # nothing left to wait for


def test_a_peer_that_stopped_reading_does_not_hold_up_the_stop(
    factory: FastAGIFactory, writer: FakeWriter, clock: Clock
) -> None:
    """The orderly close waits for the peer to read what is queued; at the stop it may not."""
    call = start(factory)
    drained = factory.drain(grace=10)
    clock.advance(10)
    assert call.transport.disconnecting and not drained.called  # closed, but the peer never reads
    aborted: list[bool] = []
    call.transport.abortConnection = lambda: (aborted.append(True), call.protocol.connectionLost())  # type: ignore[method-assign]
    clock.advance(5)
    assert aborted == [True] and drained.called
    assert [(name, kwargs.get("reason")) for name, kwargs, _ in writer.writes] == [("unrated_call", "error")]


def test_broken_environment_and_unknown_script_are_closed(factory: FastAGIFactory) -> None:
    call = Call(factory)
    call.send(b"this is not an environment\n")
    assert call.transport.disconnecting and call.sent() == []
    other = Call(factory)
    other.send(ENV.replace(b"rating?", b"billing?"))
    assert other.transport.disconnecting and other.sent() == []


def test_connection_closed_right_after_connect_is_harmless(factory: FastAGIFactory, writer: FakeWriter) -> None:
    """A port scan or health check: connect and close (panoramisk spins on this)."""
    call = Call(factory)
    call.protocol.connectionLost()
    assert writer.writes == [] and factory.stats.active == 0


def test_a_bad_rating_with_a_reason_menu_is_pushed_only_when_the_call_ends(clock: Clock, writer: FakeWriter) -> None:
    """SPEC R2.5 + R7.1: the platform gets the rating with its reasons (a pushed record cannot be amended)."""
    factory = FastAGIFactory(DialogueSettings(reason_menu=True), RatingStore(writer, clock), clock, idle_timeout=30)  # type: ignore[arg-type]
    call = start(factory)
    call.answer("200 result=53 endpos=100")  # 5 = 非常不满意
    name, kwargs, deferred = writer.writes[0]
    assert name == "call_rating" and kwargs["push_after"] is not None
    deferred.callback(("ev-9", True))
    assert call.sent() == ['SET VARIABLE HCP_RATING "1"']
    assert call.answer("200 result=1") == ['GET OPTION hcp/hcp-rating-reason-menu "1234#" 5000']
    call.answer("200 result=50 endpos=100", "200 result=0 endpos=100")
    assert writer.names() == ["call_rating", "rating_detail"]  # the push waits for the details
    assert writer.writes[1][1]["reasons"] == "efficiency"
    writer.writes[1][2].callback(None)
    assert writer.names() == ["call_rating", "rating_detail", "release_push"]
    assert writer.writes[2][1] == {"record_id": "ev-9"}


def test_the_push_is_released_only_once_a_retried_detail_is_in(clock: Clock, writer: FakeWriter) -> None:
    """SPEC R2.5: a detail write that failed once is retried; the push is let go after it, not before."""
    factory = FastAGIFactory(DialogueSettings(reason_menu=True), RatingStore(writer, clock), clock, idle_timeout=30)  # type: ignore[arg-type]
    call = start(factory)
    call.answer("200 result=53 endpos=100")
    writer.writes[0][2].callback(("ev-9", True))
    call.answer("200 result=1")
    writer.fail_next = 1  # the detail's first try fails (a locked database)
    call.answer("200 result=50 endpos=100", "200 result=0 endpos=100")
    assert writer.names() == ["call_rating", "rating_detail"]
    clock.advance(STORE_RETRY_DELAYS[0])
    assert writer.names() == ["call_rating", "rating_detail", "rating_detail"]
    writer.writes[2][2].callback(None)
    assert writer.names()[-1] == "release_push"


def test_a_good_rating_is_pushed_at_once(factory: FastAGIFactory, writer: FakeWriter) -> None:
    call = start(factory)
    call.answer("200 result=49 endpos=100")
    assert writer.writes[0][1]["push_after"] is None
