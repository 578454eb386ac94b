"""Every voice path end to end: the simulated Asterisk (faithful to the recorded transcripts) against
the FastAGI adapter and the real store, wired sans-I/O with a Clock; and the classic script as a process.

The prompts last as long as the committed WAVs, so barge-in and timeouts happen where a caller
would hear them.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from gateway.ivr.call import RatingCall, shorten
from gateway.ivr.classic import read_environment, run_call
from gateway.ivr.dialogue import DialogueSettings
from gateway.ivr.fastagi import FastAGIFactory, RatingStore
from gateway.rating import Level
from gateway.testing import asterisk as sim
from storage.schema import outbox
from storage.store import Store

REPO = Path(__file__).resolve().parents[1]


def _seconds(path: Path) -> float:
    with wave.open(str(path)) as audio:
        return audio.getnframes() / audio.getframerate()


PROMPTS = {f"hcp/{path.stem}": _seconds(path) for path in (REPO / "prompts" / "zh").glob("*.wav")}
MENU = PROMPTS["hcp/hcp-rating-menu"]
#: The console script a site installs into agi-bin.
GATEWAY_AGI = str(Path(sys.executable).with_name("gateway-agi"))


class SyncWriter:
    """The group writer, minus the threads: each write is a real store transaction, at once."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.fail = 0

    def write(self, name: str, **kwargs: Any) -> defer.Deferred[Any]:
        if self.fail:
            self.fail -= 1
            return defer.fail(RuntimeError("database is locked"))
        (result,) = self.store.write_together([(name, kwargs)])
        return defer.fail(result) if isinstance(result, Exception) else defer.succeed(result)


@dataclass
class Played:
    result: sim.CallResult
    commands: list[str]
    factory: FastAGIFactory


def play(
    store: Store,
    caller_script: str,
    *,
    settings: DialogueSettings | None = None,
    fail_writes: int = 0,
    call_id: str = "1795370491.70",
    query: str = "agent=A1024&work_order=WO-7",
    **options: Any,
) -> Played:
    """One call: the simulated channel and the FastAGI protocol exchange bytes; time jumps ahead."""
    clock = Clock()
    writer = SyncWriter(store)
    writer.fail = fail_writes
    factory = FastAGIFactory(settings or DialogueSettings(), RatingStore(writer, clock), clock, idle_timeout=60)  # type: ignore[arg-type]
    env = sim.fastagi_environment(
        "127.0.0.1",
        4573,
        f"rating?call_id={call_id}&linked_id={call_id}0&{query}",
        overrides={"agi_uniqueid": call_id, "agi_callerid": "13800138000"},
    )
    channel = sim.SimulatedChannel(env, caller_script, prompt_seconds=PROMPTS, **options)
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    lost = False

    def lose() -> None:
        nonlocal lost
        if not lost:
            lost = True
            protocol.connectionLost()

    def deliver(actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, sim.Write) and not lost:
                protocol.dataReceived(action.data)
            elif isinstance(action, sim.Close):
                lose()

    deliver(channel.start(0.0))
    commands: list[str] = []
    eof_sent = False
    for _ in range(10_000):
        written = transport.value()
        if written:
            transport.clear()
            commands += written.decode().splitlines()
            deliver(channel.receive_data(written, clock.seconds()))
            continue
        if transport.disconnecting and not eof_sent:
            eof_sent = True
            deliver(channel.receive_eof(clock.seconds()))
            lose()
            continue
        if channel.closed and lost:
            break
        due = [t for t in (channel.next_wakeup(), *(c.getTime() for c in clock.getDelayedCalls())) if t is not None]
        if not due:
            break
        clock.advance(max(0.0, min(due) - clock.seconds()))
        deliver(channel.advance(clock.seconds()))
    return Played(channel.result(), commands, factory)


def stored(store: Store, call_id: str = "1795370491.70") -> list[tuple[Level, str]]:
    return [(r.level, r.raw_input or "") for r in store.find_ratings(call_id=call_id)]


def unrated_reason(store: Store, call_id: str = "1795370491.70") -> str | None:
    record = store.get_service_record(call_id)
    return record["unratedReason"] if record else None


def test_key_during_prompt(sqlite_store: Store) -> None:
    """SPEC R2.2 barge-in (fixture a): 2 pressed 1.5 s into a 14 s prompt → 满意, stored, thanked."""
    played = play(sqlite_store, "w1.5 d2")
    assert played.result.variables["HCP_RATING"] == "4"
    assert stored(sqlite_store) == [(Level.SATISFIED, "2")]
    assert played.commands[-1] == 'STREAM FILE hcp/hcp-rating-thanks ""'
    assert played.result.agi_status == "SUCCESS" and played.result.ended_by == "program"


def test_key_after_prompt_during_the_wait(sqlite_store: Store) -> None:
    """Fixture r: GET OPTION waits after the prompt; a key 2 s after it ends is still taken."""
    played = play(sqlite_store, f"w{MENU + 2:.2f} d1")
    assert played.result.variables["HCP_RATING"] == "5"
    assert stored(sqlite_store) == [(Level.VERY_SATISFIED, "1")]


def test_invalid_then_valid(sqlite_store: Store) -> None:
    """SPEC R2.3 (fixtures d, d2): 9 interrupts, a hint, the menu again, then 3."""
    played = play(sqlite_store, "w1 d9 w6 d3")
    assert 'STREAM FILE hcp/hcp-rating-invalid "0123456789*#"' in played.commands
    assert stored(sqlite_store) == [(Level.BASICALLY_SATISFIED, "3")]


def test_a_key_during_the_hint_is_the_rating_on_the_simulated_channel(sqlite_store: Store) -> None:
    """SPEC R2.2: 9, then 2 while the invalid-key hint plays: Asterisk stops it and returns the key."""
    played = play(sqlite_store, "w1 d9 w1.2 d2")
    hint_at = played.commands.index('STREAM FILE hcp/hcp-rating-invalid "0123456789*#"')
    assert not any(c.startswith("GET OPTION") for c in played.commands[hint_at:])
    assert stored(sqlite_store) == [(Level.SATISFIED, "2")]


def test_three_timeouts_end_politely_not_rated(sqlite_store: Store) -> None:
    """SPEC R2.3 (fixture c): no key three times → goodbye, recorded not rated (timeout)."""
    played = play(sqlite_store, "w200")
    assert played.commands.count('GET OPTION hcp/hcp-rating-menu "0123456789*#" 5000') == 3
    assert played.commands[-1] == 'STREAM FILE hcp/hcp-rating-goodbye ""'
    assert stored(sqlite_store) == [] and unrated_reason(sqlite_store) == "timeout"
    assert "HCP_RATING" not in played.result.variables


@pytest.mark.parametrize("sighup", [True, False])
def test_hangup_during_prompt(sqlite_store: Store, sighup: bool) -> None:
    """Fixtures e, e2: result=-1, then (with AGISIGHUP) a HANGUP line; recorded not rated."""
    played = play(sqlite_store, "w2 h", sighup=sighup)
    assert stored(sqlite_store) == [] and unrated_reason(sqlite_store) == "hangup"
    assert played.result.agi_status == "HANGUP"


def test_hangup_during_prompt_with_exit_on_hangup(sqlite_store: Store) -> None:
    """Fixture e3: Asterisk closes the socket itself."""
    play(sqlite_store, "w2 h", exit_on_hangup=True)
    assert unrated_reason(sqlite_store) == "hangup"


def test_hangup_during_wait(sqlite_store: Store) -> None:
    """Fixture f: the caller leaves while GET OPTION waits after the prompt."""
    play(sqlite_store, f"w{MENU + 1:.2f} h")
    assert stored(sqlite_store) == [] and unrated_reason(sqlite_store) == "hangup"


@pytest.mark.parametrize("sighup", [True, False])
def test_key_then_hangup_is_stored(sqlite_store: Store, sighup: bool) -> None:
    """SPEC R2.4, fixture n: 4 then hang-up at once: the rating is stored, HCP_RATING still set."""
    played = play(sqlite_store, "w1.5 d4 w0.1 h", sighup=sighup)
    assert stored(sqlite_store) == [(Level.DISSATISFIED, "4")]
    assert played.result.variables.get("HCP_RATING") == "2"
    assert unrated_reason(sqlite_store) is None


def test_hangup_after_the_key_during_the_thank_you(sqlite_store: Store) -> None:
    play(sqlite_store, "w1 d1 w0.6 h")
    assert stored(sqlite_store) == [(Level.VERY_SATISFIED, "1")]


def test_missing_menu_prompt_is_an_error_not_a_hangup(sqlite_store: Store) -> None:
    """Fixture h: result=-1 endpos=0 with the channel up; CHANNEL STATUS tells them apart."""
    played = play(sqlite_store, "w30", missing_files={"hcp/hcp-rating-menu"})
    assert "CHANNEL STATUS" in played.commands
    assert unrated_reason(sqlite_store) == "error"


@pytest.mark.parametrize("kind", list(sim.FaultKind))
@pytest.mark.parametrize("at_reply", [0, 1, 2])
def test_garbled_truncated_stalled_reset_or_oversized_peer_ends_the_call_cleanly(
    sqlite_store: Store, kind: sim.FaultKind, at_reply: int
) -> None:
    """A bad peer ends its own call: no crash, no rating invented, the connection closed."""
    played = play(sqlite_store, "w1.5 d2", fault=sim.Fault(kind, at_reply=at_reply))
    assert played.factory.stats.active == 0
    ratings = stored(sqlite_store)
    assert ratings in ([], [(Level.SATISFIED, "2")])


def test_a_stalled_peer_after_the_key_still_leaves_the_rating_stored(sqlite_store: Store) -> None:
    played = play(sqlite_store, "w1.5 d2", fault=sim.Fault(sim.FaultKind.STALL, at_reply=3))
    assert stored(sqlite_store) == [(Level.SATISFIED, "2")]
    assert played.factory.stats.active == 0


def test_identifiers_longer_than_the_store_holds_are_cut_and_the_key_is_stored(store: Store) -> None:
    """SPEC R2.4 on both backends: PostgreSQL refuses a 65th character where SQLite would not."""
    work_order, agent = "WO-" + "9" * 97, "A" * 80
    play(store, "w1.5 d2", query=f"agent={agent}&work_order={work_order}")
    assert stored(store) == [(Level.SATISFIED, "2")]
    record = store.get_service_record("1795370491.70")
    assert record is not None and (record["workOrder"], record["agentId"]) == (
        shorten(work_order, 64),
        shorten(agent, 64),
    )
    assert record["workOrder"].startswith(work_order[:52]) and len(record["workOrder"]) == 64


def test_locked_database_is_retried_and_the_key_is_not_lost(sqlite_store: Store) -> None:
    play(sqlite_store, "w1.5 d5", fail_writes=2)
    assert stored(sqlite_store) == [(Level.VERY_DISSATISFIED, "5")]


def test_reason_menu_and_voice_comment_after_a_bad_rating(sqlite_store: Store) -> None:
    """SPEC R2.5: 非常不满意, reason 3 (问题未解决), a comment ended by #."""
    settings = DialogueSettings(reason_menu=True, voice_comment=True)
    played = play(sqlite_store, "w1 d5 w3 d3 w20 d#", settings=settings)
    assert any(c.startswith("RECORD FILE /var/spool/asterisk/hcp-comments/1795370491.70 wav") for c in played.commands)
    (rating,) = sqlite_store.find_ratings(call_id="1795370491.70")
    assert rating.level is Level.VERY_DISSATISFIED and rating.reasons == "unresolved"
    with sqlite_store.engine.connect() as connection:  # held while the caller answered, released at the end
        due = connection.execute(select(outbox.c.next_attempt_at).where(outbox.c.record_id == rating.record_id))
        assert due.scalar_one() <= datetime.now(UTC)


def test_second_call_rating_for_the_same_call_is_kept_as_an_attempt(sqlite_store: Store) -> None:
    """SPEC R1.4: one rating per service; a replayed hand-off does not replace it."""
    play(sqlite_store, "w1 d1")
    play(sqlite_store, "w1 d5")
    ratings = sqlite_store.find_ratings(call_id="1795370491.70")
    assert [(r.level, r.is_attempt) for r in ratings] == [
        (Level.VERY_SATISFIED, False),
        (Level.VERY_DISSATISFIED, True),
    ]


# -- the classic AGI script, as Asterisk runs it ---------------------------------------------


@pytest.fixture
def classic_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    yield {"GATEWAY_STORE_DATA_DIR": str(tmp_path / "data"), "GATEWAY_CONFIG": ""}


def classic_store(tmp_path: Path) -> Store:
    from gateway.config import load_config

    return Store.from_config(load_config(None, environ={"GATEWAY_STORE_DATA_DIR": str(tmp_path / "data")}))


def run_classic(arguments: list[str], script: str, unique_id: str, classic_env: dict[str, str]) -> sim.CallResult:
    """``gateway-agi`` started as Asterisk starts it, the caller following ``script``."""
    return sim.run_classic_agi(
        [GATEWAY_AGI, *arguments],
        script,
        env_extra=classic_env,
        timeout=60,
        time_scale=0.3,
        prompt_seconds=PROMPTS,
        agi_env={"agi_uniqueid": unique_id, "agi_callerid": "13900001111"},
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "expected", "reason"),
    [
        # Keys come 1.2 s (real) into the call at the earliest: the script takes about 0.5 s to
        # load, and a key pressed before it asks for one is dropped, as Asterisk drops it.
        ("w4 d1", [(Level.VERY_SATISFIED, "1")], None),  # fixture m
        ("w4 d4 w0.1 h", [(Level.DISSATISFIED, "4")], None),  # key then SIGHUP
        ("w2 h", [], "hangup"),  # fixture m2: SIGHUP instead of a HANGUP line
        ("w4 d9 w6 d2", [(Level.SATISFIED, "2")], None),
        # SIGHUP while the script is still loading (before pyst2's handler): recorded, not killed.
        ("w1 h", [], "hangup"),
    ],
)
def test_classic_agi_script(
    tmp_path: Path, classic_env: dict[str, str], script: str, expected: list[tuple[Level, str]], reason: str | None
) -> None:
    store = classic_store(tmp_path)  # creates the schema, as `gateway db upgrade` would
    result = run_classic(["call_id=1795370500.1", "agent=A7", "work_order=WO-9"], script, "1795370500.1", classic_env)
    assert result.exit_status == 0, result.stderr.decode()
    assert b"13900001111" not in result.stderr  # SPEC R5.1: nothing personal on Asterisk's console
    assert stored(store, "1795370500.1") == expected
    assert unrated_reason(store, "1795370500.1") == reason
    if expected:
        assert result.variables["HCP_RATING"] == str(int(expected[0][0]))


@pytest.mark.slow
def test_classic_agi_script_reads_the_dialplans_query_argument(tmp_path: Path, classic_env: dict[str, str]) -> None:
    """hcp-rating-classic passes the identifiers URIENCODE'd after a '?' (dialplans/hcp-rating.conf):
    a work order with a comma, a quote and a backslash reaches the service record whole (SPEC R2.1)."""
    store = classic_store(tmp_path)
    query = "?call_id=1795370500.2&linked_id=1795370500.1&agent=A%207&work_order=WO%2C9%20%22a%5Cb%22&matter=&queue="
    result = run_classic([query], "w4 d1", "1795370500.2", classic_env)
    assert result.exit_status == 0, result.stderr.decode()
    assert stored(store, "1795370500.2") == [(Level.VERY_SATISFIED, "1")]
    record = store.get_service_record("1795370500.2")
    assert record is not None
    assert (record["workOrder"], record["agentId"], record["linkedId"]) == ('WO,9 "a\\b"', "A 7", "1795370500.1")


def test_classic_script_reads_an_environment_that_is_not_utf8(tmp_path: Path) -> None:
    """A trunk's GBK caller name (张三) would make pyst2 raise; the call is played all the same."""
    block = (
        b"agi_request: gateway-agi\nagi_channel: PJSIP/trunk-00000001\nagi_uniqueid: 1795370500.9\n"
        b"agi_callerid: 13900001111\nagi_calleridname: \xd5\xc5\xc8\xfd\nagi_arg_1: ?work_order=WO-9\n\n"
    )
    answers = b"200 result=0\n200 result=49 endpos=100\n200 result=1\n200 result=0 endpos=100\n"
    stdin = io.BytesIO(block + answers)
    previous = signal.getsignal(signal.SIGHUP)
    try:
        with open(os.devnull, "w") as quiet:
            environment, hung_up = read_environment(stdin, quiet)  # type: ignore[arg-type]
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert environment == block and not hung_up()
    store = classic_store(tmp_path)
    stdout = io.BytesIO()
    call = RatingCall(DialogueSettings(), check_script=False)
    assert run_call(stdin, stdout, store, call, environment) == 0
    assert stored(store, "1795370500.9") == [(Level.VERY_SATISFIED, "1")]
    assert b'SET VARIABLE HCP_RATING "5"' in stdout.getvalue()
