"""The simulated Asterisk's shortcuts read and record exactly as the plain ways do.

The load generator plays thousands of calls on the same 2 cores as the server it measures, so
the channel reads command lines a part at a time instead of byte by byte, finds commands in a
dict instead of walking the table, cuts lines out of the bytes as they come, and keeps its
transcript as entries that become lines only when someone looks. Each shortcut is checked here
against the plain way it replaces; the recordings (test_asterisk_simulator.py) check the rest.
"""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.testing.asterisk import (
    _COMMANDS,
    AGI_BUF_LEN,
    MAX_ARGS,
    Fault,
    FaultKind,
    SimulatedChannel,
    TranscriptLine,
    _Command,
    _find_command,
    _parse_agi_arguments_bytewise,
    fastagi_environment,
    parse_agi_arguments,
)

#: Bytes that matter to res_agi.c's parse_args, and some that do not.
LINE_BYTES = st.lists(st.sampled_from([b"a", b"B", b" ", b"  ", b"\t", b'"', b'""', b"\r", b"\\", "服".encode()]))


@settings(max_examples=3000)
@given(LINE_BYTES)
def test_command_lines_split_by_parts_as_byte_by_byte(parts: list[bytes]) -> None:
    line = b"".join(parts)
    assert parse_agi_arguments(line) == _parse_agi_arguments_bytewise(line)


@given(st.lists(st.sampled_from([b"w", b'"q r"', b'""', b'z"y', b'"', b"\t"]), min_size=120, max_size=140))
def test_words_past_the_127th_are_dropped_as_byte_by_byte(words: list[bytes]) -> None:
    line = b" ".join(words)
    assert parse_agi_arguments(line) == _parse_agi_arguments_bytewise(line)
    assert len(_parse_agi_arguments_bytewise(b" ".join([b"w"] * 200))) == MAX_ARGS - 1


def _walk(argv: Sequence[bytes]) -> _Command | None:
    """find_command as res_agi.c does it: the first command of the table whose words all match."""
    lowered = [word.lower() for word in argv[:3]]
    for command in _COMMANDS:
        words = command.words
        if len(argv) >= len(words) and all(lowered[i] == word for i, word in enumerate(words)):
            return command
    return None


COMMAND_WORDS = [*sorted({word for command in _COMMANDS for word in command.words}), b"x", b"datetime2"]


@settings(max_examples=3000)
@given(st.lists(st.sampled_from(COMMAND_WORDS).map(lambda word: word.upper() if len(word) % 2 else word), max_size=5))
def test_commands_are_found_as_by_a_walk_through_the_table(argv: list[bytes]) -> None:
    assert _find_command(argv) is _walk(argv)


def test_every_command_is_found_by_its_words_in_any_case_with_arguments() -> None:
    for command in _COMMANDS:
        for extra in ([], [b"beep"], [b"beep", b'"1"']):
            argv = [word.title() for word in command.words] + extra
            assert _find_command(argv) is _walk(argv) is command


def _fgets_lines(data: bytes) -> list[bytes]:
    """What Asterisk's fgets into a 2048-byte buffer makes of ``data``: lines and cut pieces."""
    lines = []
    while True:
        end = data.find(b"\n", 0, AGI_BUF_LEN - 1)
        if end >= 0:
            lines.append(data[:end])
            data = data[end + 1 :]
        elif len(data) >= AGI_BUF_LEN - 1:
            lines.append(data[: AGI_BUF_LEN - 1])
            data = data[AGI_BUF_LEN - 1 :]
        else:
            return lines


ENVIRONMENT = fastagi_environment("127.0.0.1", 4573, "rating")


def _channel() -> SimulatedChannel:
    channel = SimulatedChannel(ENVIRONMENT, "w100")
    channel.start(0.0)
    return channel


@given(
    st.lists(st.sampled_from([b"NOOP\n", b"VERBOSE x 1\n", b"y" * 3000, b"z" * 2046 + b"\n", b"\n", b"n"]), max_size=6),
    st.lists(st.integers(min_value=1, max_value=4000), max_size=5),
)
def test_lines_are_the_same_however_the_bytes_are_cut(pieces: list[bytes], cuts: list[int]) -> None:
    data = b"".join(pieces)
    channel = _channel()
    start = 0
    for cut in [*sorted(cuts), len(data)]:
        if cut > start:
            channel.receive_data(data[start:cut], 0.0)
            start = cut
    read = [entry[2] for entry in channel.transcript_entries if entry[1] == ">>"]
    assert read == _fgets_lines(data)


def test_the_transcript_shows_each_written_line_and_a_missing_newline() -> None:
    channel = SimulatedChannel(fastagi_environment("127.0.0.1", 4573, "rating"), fault=Fault(FaultKind.TRUNCATE, 1))
    channel.start(0.0)
    assert len(channel.transcript) == len(channel.environment) + 1  # lines and the empty one
    channel.receive_data(b"NOOP\n", 0.5)
    written = [entry for entry in channel.transcript_entries if entry[1] == "<<"]
    assert [data for _, _, data in written] == [written[0][2], b"200 re"]
    assert written[0][2].count(b"\n") == len(channel.environment) + 1
    assert channel.transcript[-5:] == [
        TranscriptLine(0.5, ">>", b"NOOP"),
        TranscriptLine(0.5, "!!", b"fault: truncate instead of reply 1"),
        TranscriptLine(0.5, "<<", b"200 re"),
        TranscriptLine(0.5, "!!", b"(no newline)"),
        TranscriptLine(0.5, "!!", b"Asterisk closes the connection"),
    ]
    assert channel.result().transcript == channel.transcript


def test_a_transcript_read_during_the_call_ends_as_one_read_at_the_end() -> None:
    during, after = _channel(), _channel()
    for channel in (during, after):
        for t, data in ((0.1, b"NOOP\n"), (0.2, b'STREAM FILE beep ""\n'), (0.3, b"BOGUS\n")):
            channel.receive_data(data, t)
            if channel is during:
                assert during.transcript[-1].time == t
        channel.receive_eof(1.0)
        channel.advance(2.0)
    assert during.transcript == after.transcript


def test_without_a_transcript_nothing_is_kept() -> None:
    channel = SimulatedChannel(fastagi_environment("127.0.0.1", 4573, "rating"), record_transcript=False)
    channel.start(0.0)
    channel.receive_data(b"NOOP\n", 0.1)
    assert channel.transcript == [] and channel.transcript_entries == [] and channel.result().transcript == []
