"""The AGI wire protocol (gateway.ivr.agi), tested with lines from a real Asterisk.

The response and environment lines below are copied from the transcripts in
``fixtures/agi`` (Asterisk GIT-master-f0c1c1a7b7); the fixture-scanning tests read every
transcript when the directory is available (``HCP_AGI_FIXTURES``, ``tests/fixtures/agi``,
``fixtures/agi`` or ``../shared/fixtures/agi`` beside the checkout, as in CI).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.ivr.agi import (
    AGICommand,
    AGIConnection,
    AGIEnvironmentError,
    AGIEnvironmentParser,
    AGILocalError,
    AGIRequest,
    AGIResponseError,
    CommandResponse,
    ConnectionClosed,
    ConnectionState,
    EnvironmentReady,
    HangupNotice,
    ProtocolError,
    Response,
    answer,
    channel_status,
    get_option,
    get_variable,
    hangup,
    key_from_result,
    parse_response,
    quote_argument,
    record_file,
    set_variable,
    stream_file,
    verbose,
    wait_for_digit,
)
from gateway.ivr.agi import _parse_any_response as parse_any_response

# --------------------------------------------------------------------------------------------
# Transcripts

REPO = Path(__file__).resolve().parent.parent


def _fixture_dir() -> Path | None:
    candidates = [
        os.environ.get("HCP_AGI_FIXTURES", ""),
        REPO / "tests" / "fixtures" / "agi",
        REPO / "fixtures" / "agi",
        REPO.parent / "shared" / "fixtures" / "agi",
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir() and any(Path(candidate).glob("*.txt")):
            return Path(candidate)
    return None


FIXTURES = _fixture_dir()
if FIXTURES is None and os.environ.get("CI"):
    raise RuntimeError("the AGI transcripts (../shared/fixtures/agi) are missing; CI must test against them")
needs_fixtures = pytest.mark.skipif(FIXTURES is None, reason="AGI transcripts not found")
TRANSCRIPTS = sorted(FIXTURES.glob("*.txt")) if FIXTURES else []

_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|[rnt\\])")


def _unescape(text: str) -> str:
    """Undo the recorder's escaping of unprintable bytes (``NOOP\\r``)."""

    def replace(match: re.Match[str]) -> str:
        code = match.group(1)
        return {"r": "\r", "n": "\n", "t": "\t", "\\": "\\"}.get(code) or chr(int(code[1:], 16))

    return _ESCAPE.sub(replace, text)


@dataclass(frozen=True)
class Step:
    direction: str  # "<<" from Asterisk, ">>" to Asterisk, "!!" a note
    text: str


def load_transcript(path: Path) -> list[Step]:
    steps = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        if raw.startswith("#") or not raw.strip():
            continue
        direction, text = raw[7:9], raw[10:]
        assert direction in ("<<", ">>", "!!"), raw
        steps.append(Step(direction, _unescape(text) if direction != "!!" else text))
    return steps


def split_environment(steps: list[Step]) -> tuple[list[str], list[Step]]:
    """The environment lines (without the empty line) and the steps after it."""
    for index, step in enumerate(steps):
        if step.direction == "<<" and step.text == "":
            return [s.text for s in steps[:index] if s.direction == "<<"], steps[index + 1 :]
    raise AssertionError("no empty line ends the environment")


# --------------------------------------------------------------------------------------------
# parse_response

RESPONSES = [
    # line, code, result, data, endpos, message
    ("200 result=50 endpos=13600", 200, "50", None, 13600, ""),  # a
    ("200 result=0 endpos=3404", 200, "0", None, 3404, ""),  # c
    ("200 result=0", 200, "0", None, None, ""),  # ANSWER
    ("200 result=51", 200, "51", None, None, ""),  # b: WAIT FOR DIGIT
    ("200 result= (timeout)", 200, "", "timeout", None, ""),  # c, o: GET DATA
    ("200 result=56 (timeout)", 200, "56", "timeout", None, ""),  # g
    ("200 result=1234", 200, "1234", None, None, ""),  # g
    ("200 result=1 (1795370491.70)", 200, "1", "1795370491.70", None, ""),  # i
    ("200 result=1 (very good service)", 200, "1", "very good service", None, ""),  # i
    ("200 result=1 (服务很好)", 200, "1", "服务很好", None, ""),  # i: UTF-8
    ("200 result=1 (a (b) c)", 200, "1", "a (b) c", None, ""),  # parentheses in a value
    ("200 result=1 ()", 200, "1", "", None, ""),  # empty value
    ("200 result=35 (dtmf) endpos=42518", 200, "35", "dtmf", 42518, ""),  # l
    ("200 result=0 (timeout) endpos=8000", 200, "0", "timeout", 8000, ""),  # RECORD FILE
    ("200 result=-1 (hangup) endpos=16000", 200, "-1", "hangup", 16000, ""),  # RECORD FILE
    ("200 result=-1 endpos=0", 200, "-1", None, 0, ""),  # h: missing file
    ("200 result=-1 endpos=16000", 200, "-1", None, 16000, ""),  # e
    ("200 result=-1", 200, "-1", None, None, ""),  # f, h
    ("200 result=6", 200, "6", None, None, ""),  # CHANNEL STATUS
    ("200 result=52 endpos=1700", 200, "52", None, 1700, ""),  # j (ms)
    ("200 result=0 Gosub complete", 200, "0", None, None, "Gosub complete"),
    ("100 result=0 Trying...", 100, "0", None, None, "Trying..."),
    ("503 result=-2 Memory allocation failure", 503, "-2", None, None, "Memory allocation failure"),
    ("510 Invalid or unknown command", 510, None, None, None, "Invalid or unknown command"),
    (
        "511 Command Not Permitted on a dead channel or intercept routine",
        511,
        None,
        None,
        None,
        "Command Not Permitted on a dead channel or intercept routine",
    ),
    ("520 End of proper usage.", 520, None, None, None, "End of proper usage."),
    (
        "520 Invalid command syntax.  Proper usage not available.",
        520,
        None,
        None,
        None,
        "Invalid command syntax.  Proper usage not available.",
    ),
]


@pytest.mark.parametrize(("line", "code", "result", "data", "endpos", "message"), RESPONSES)
def test_real_response_lines_parse(line, code, result, data, endpos, message):
    response = parse_response(line)
    assert isinstance(response, Response)
    assert (response.code, response.result, response.data, response.endpos, response.message) == (
        code,
        result,
        data,
        endpos,
        message,
    )
    assert response.continues is False
    assert response.line == line


def test_first_line_of_520_block_continues():
    response = parse_response("520-Invalid command syntax.  Proper usage follows:")
    assert isinstance(response, Response)
    assert response.code == 520
    assert response.continues is True
    assert response.message == "Invalid command syntax.  Proper usage follows:"


def test_hangup_line_is_a_notice_not_a_response():
    assert parse_response("HANGUP") == HangupNotice()


def test_other_key_value_pairs_are_kept():
    response = parse_response("200 result=1 (speech) endpos=9000 results=2")
    assert isinstance(response, Response)
    assert response.endpos == 9000
    assert response.extras == (("results", "2"),)


def test_trailing_carriage_return_is_ignored():
    response = parse_response("200 result=0\r")
    assert isinstance(response, Response)
    assert response.result == "0"


@pytest.mark.parametrize(
    "line",
    [
        "",
        "hello",
        "hangup",
        "HANGUP now",
        "200",
        "510",
        "200 ok",
        "200 result",
        "2000 result=1",
        " 200 result=0",
        "200 result=1 endpos=abc",
        "GET / HTTP/1.1",
        "SSH-2.0-OpenSSH_9.6",
        "agi_network: yes",
    ],
)
def test_garbage_is_a_protocol_error(line):
    with pytest.raises(AGIResponseError):
        parse_response(line)


def test_error_messages_mask_long_digit_runs():
    """SPEC R5.1: a garbled line may hold a phone number; the error (a log line) must not."""
    with pytest.raises(AGIResponseError) as caught:
        parse_response("13800138000 is not a response")
    assert "13800138000" not in str(caught.value)


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("200 result=50 endpos=13600", "2"),
        ("200 result=49", "1"),
        ("200 result=57", "9"),
        ("200 result=48", "0"),
        ("200 result=35 (dtmf) endpos=42518", "#"),
        ("200 result=42", "*"),
        ("200 result=0 endpos=3404", None),
        ("200 result=0", None),
    ],
)
def test_key_from_result_reads_ascii_codes(line, key):
    assert key_from_result(parse_response(line)) == key


@pytest.mark.parametrize(
    "line",
    [
        "200 result=-1 endpos=0",  # hang-up or missing file: the caller must decide first
        "200 result=1",  # a pipelined command's answer to WAIT FOR DIGIT (fixture p)
        "200 result=1234",  # GET DATA returns digits as text
        "200 result= (timeout)",
        "511 Command Not Permitted on a dead channel or intercept routine",
    ],
)
def test_key_from_result_refuses_what_is_no_key(line):
    with pytest.raises(AGIResponseError):
        key_from_result(parse_response(line))


@needs_fixtures
@pytest.mark.parametrize("path", TRANSCRIPTS, ids=lambda p: p.stem)
def test_every_line_asterisk_sent_after_the_environment_parses(path):
    """Every ``<<`` line of every transcript is a response, part of a 520 block, or HANGUP."""
    _, steps = split_environment(load_transcript(path))
    block_code: int | None = None
    for step in steps:
        if step.direction != "<<":
            continue
        if block_code is not None:
            if step.text.startswith(f"{block_code} "):
                parsed = parse_response(step.text)
                assert isinstance(parsed, Response)
                assert parsed.code == block_code
                block_code = None
            continue  # a usage line: raw documentation text
        parsed = parse_response(step.text)
        assert isinstance(parsed, Response | HangupNotice), step.text
        if isinstance(parsed, Response) and parsed.continues:
            block_code = parsed.code
    assert block_code is None, f"{path.name}: a 520 block was never closed"


SOME_ANSWERS = [
    "200 result=50 endpos=13600",
    "200 result=0",
    "200 result=-1 endpos=0",
    "200 result=0 endpos=3404\r",
    "200 result= (timeout)",
    "200 result=1 (very good service)",
    "200 result=35 (dtmf) endpos=42518",
    "200 result=0 Gosub complete",
    "200 result=007 endpos=00",
    "200 result=5 endpos=",
    "200 result=5 endpos=x",
    "200 result=5  endpos=1",
    "201 result=5",
    "511 Command Not Permitted on a dead channel or intercept routine",
    "HANGUP",
]


@pytest.mark.parametrize("line", SOME_ANSWERS + [step.text for path in TRANSCRIPTS for step in load_transcript(path)])
def test_the_quick_path_for_common_answers_reads_them_as_the_full_parser_does(line):
    """``200 result=N [endpos=M]`` skips the general pattern; anything else goes through it."""
    try:
        expected: object = parse_any_response(line)
    except AGIResponseError as error:
        expected = ("error", str(error))
    try:
        got: object = parse_response(line)
    except AGIResponseError as error:
        got = ("error", str(error))
    assert got == expected
    if isinstance(got, Response):
        assert got.line == line


def test_fixture_directory_holds_transcripts():
    if FIXTURES is None:
        pytest.skip("AGI transcripts not found")
    assert len(TRANSCRIPTS) >= 20


# --------------------------------------------------------------------------------------------
# The environment block

I_ENV = [
    "agi_network: yes",
    "agi_network_script: i-env-and-vars?call_id=1795370491.70&work_order=WO-1&agent=A7",
    "agi_request: agi://127.0.0.1:4599/i-env-and-vars?call_id=1795370491.70&work_order=WO-1&agent=A7",
    "agi_channel: Local/s@caller-sim-00000023;1",
    "agi_language: en",
    "agi_type: Local",
    "agi_uniqueid: 1795370491.70",
    "agi_version: GIT-master-f0c1c1a7b7",
    "agi_callerid: 13800138000",
    "agi_calleridname: unknown",
    "agi_callingpres: 0",
    "agi_callingani2: 0",
    "agi_callington: 0",
    "agi_callingtns: 0",
    "agi_dnid: unknown",
    "agi_rdnis: unknown",
    "agi_context: hotline-rating",
    "agi_extension: s",
    "agi_priority: 7",
    "agi_enhanced: 0.0",
    "agi_accountcode: ",
    "agi_threadid: 139917447243456",
    "agi_arg_1: arg-one",
    "agi_arg_2: arg two",
    "agi_arg_3: ",
    "agi_arg_4: 评价",
]

M_ENV = [
    "agi_request: classic_agi_recorder.py",
    "agi_channel: Local/s@caller-sim-0000002e;1",
    "agi_language: en",
    "agi_type: Local",
    "agi_uniqueid: 1795370531.92",
    "agi_version: GIT-master-f0c1c1a7b7",
    "agi_callerid: 13800138000",
    "agi_calleridname: unknown",
    "agi_callingpres: 0",
    "agi_callingani2: 0",
    "agi_callington: 0",
    "agi_callingtns: 0",
    "agi_dnid: unknown",
    "agi_rdnis: unknown",
    "agi_context: hotline-rating",
    "agi_extension: s",
    "agi_priority: 7",
    "agi_enhanced: 0.0",
    "agi_accountcode: ",
    "agi_threadid: 139917442041536",
    "agi_arg_1: m-classic-agi",
    "agi_arg_2: arg two",
]


def parse_environment(lines: list[str], **limits: int) -> AGIRequest:
    parser = AGIEnvironmentParser(**limits)
    for line in lines:
        assert parser.feed_line(line) is None
    request = parser.feed_line("")
    assert request is not None and parser.complete
    return request


def test_fastagi_environment_with_query_and_arguments():
    request = parse_environment(I_ENV)
    assert request.network is True
    assert request.script == "i-env-and-vars"
    assert dict(request.params) == {"call_id": "1795370491.70", "work_order": "WO-1", "agent": "A7"}
    assert request.args == ("arg-one", "arg two", "", "评价")
    assert request.unique_id == "1795370491.70"
    assert request.caller_id == "13800138000"
    assert request.channel == "Local/s@caller-sim-00000023;1"
    assert request.language == "en"
    assert request.env["agi_accountcode"] == ""
    assert request.env["agi_calleridname"] == "unknown"


def test_classic_environment_has_no_network_lines():
    request = parse_environment(M_ENV)
    assert request.network is False
    assert request.script == "classic_agi_recorder.py"
    assert request.args == ("m-classic-agi", "arg two")
    assert dict(request.params) == {}
    assert request.unique_id == "1795370531.92"


def test_request_repr_hides_the_callers_number():
    """SPEC R5.1: a logged request must not carry the phone number."""
    assert "13800138000" not in repr(parse_environment(I_ENV))


@pytest.mark.parametrize("value", ["unknown", "", "Unknown"])
def test_unknown_caller_id_is_none(value):
    request = parse_environment(["agi_request: x.py", f"agi_callerid: {value}"])
    assert request.caller_id is None


def test_key_value_arguments_join_the_query_and_win():
    request = parse_environment(
        [
            "agi_network: yes",
            "agi_network_script: rating?call_id=1.2&work_order=WO%2D9&matter=%E8%AF%84%E4%BB%B7&plus=a+b&flag",
            "agi_request: agi://127.0.0.1/rating?…",
            "agi_arg_1: work_order=WO-10",
            "agi_arg_2: agent=A 7",
            "agi_arg_3: not a param",
            "agi_arg_4: =no key",
            "agi_arg_5: url=http://x/?a=b",
        ]
    )
    assert request.script == "rating"
    assert dict(request.params) == {
        "call_id": "1.2",
        "work_order": "WO-10",  # the argument wins over the query
        "matter": "评价",  # percent-decoded UTF-8
        "plus": "a+b",  # '+' is not a space (Asterisk's URIENCODE writes %20)
        "flag": "",
        "agent": "A 7",
        "url": "http://x/?a=b",
    }
    assert request.args[2] == "not a param"


def test_a_query_argument_is_decoded_as_the_url_query():
    """Classic AGI has no URL: the dialplan passes the FastAGI query, URIENCODE'd, as ``?…``."""
    request = parse_environment(
        [
            "agi_request: gateway-agi",
            # URIENCODE's output for 'WO,9 "a\\b"' and 评价; a '+' written unencoded stays a '+'.
            "agi_arg_1: ?call_id=1795370500.1&work_order=WO%2C9%20%22a%5Cb%22&matter=%E8%AF%84%E4%BB%B7"
            "&queue=A+B&agent=",
        ]
    )
    assert dict(request.params) == {
        "call_id": "1795370500.1",
        "work_order": 'WO,9 "a\\b"',
        "matter": "评价",
        "queue": "A+B",  # '+' is not a space, as in the URL
        "agent": "",
    }
    assert request.args == (request.env["agi_arg_1"],)


def test_later_arguments_win_whatever_their_form():
    request = parse_environment(
        [
            "agi_network: yes",
            "agi_network_script: rating?agent=url&work_order=url&queue=url",
            "agi_arg_1: agent=raw",
            "agi_arg_2: ?agent=query&work_order=query",
            "agi_arg_3: work_order=raw%2C",
        ]
    )
    assert dict(request.params) == {"agent": "query", "work_order": "raw%2C", "queue": "url"}


def test_a_malformed_query_argument_is_read_as_far_as_it_goes():
    request = parse_environment(["agi_request: gateway-agi", "agi_arg_1: ?&&call_id=%E8%AF&=x&agent=%zz"])
    assert request.params["call_id"] == "\ufffd"  # a truncated UTF-8 sequence is replaced, not an error
    assert request.params["agent"] == "%zz"
    assert request.params[""] == "x"


def test_arguments_are_ordered_by_number_not_by_arrival():
    request = parse_environment(["agi_request: x.py", "agi_arg_10: ten", "agi_arg_2: two", "agi_arg_1: one"])
    assert request.args == ("one", "two", "ten")


def test_invalid_utf8_in_the_environment_is_replaced_not_fatal():
    conn = AGIConnection()
    conn.receive_data(b"agi_request: x.py\nagi_callerid: \xff\xfe138\nagi_arg_1: caf\xc3\n\n")
    event = conn.next_event()
    assert isinstance(event, EnvironmentReady)
    assert event.request.caller_id == "\ufffd\ufffd138"
    assert event.request.args == ("caf\ufffd",)


@pytest.mark.parametrize(
    ("lines", "complaint"),
    [
        (["agi_network yes"], "is not 'agi_<name>: <value>'"),
        (["agi_network:yes"], "is not 'agi_<name>: <value>'"),
        (["network: yes"], "agi_ name"),
        (["GET / HTTP/1.1"], "is not 'agi_<name>: <value>'"),
        (["agi_request: a", "agi_request: b"], "appears twice"),
        ([""], "empty"),
    ],
)
def test_malformed_environment_is_rejected(lines, complaint):
    parser = AGIEnvironmentParser()
    with pytest.raises(AGIEnvironmentError, match=re.escape(complaint)):
        for line in lines:
            parser.feed_line(line)


def test_environment_line_limit_is_enforced():
    parser = AGIEnvironmentParser(max_lines=3)
    for n in range(3):
        parser.feed_line(f"agi_arg_{n}: x")
    with pytest.raises(AGIEnvironmentError, match="more than 3 lines"):
        parser.feed_line("agi_arg_9: x")


def test_default_limits_allow_256_lines_of_8_kib():
    parser = AGIEnvironmentParser()
    for n in range(256):
        parser.feed_line(f"agi_arg_{n}: " + "x" * (8192 - 20))
    with pytest.raises(AGIEnvironmentError):
        parser.feed_line("agi_arg_999: x")
    with pytest.raises(AGIEnvironmentError, match="longer than 8192 bytes"):
        AGIEnvironmentParser().feed_line("agi_x: " + "x" * 8192)


def test_line_length_counts_utf8_bytes():
    parser = AGIEnvironmentParser(max_line_length=20)
    parser.feed_line("agi_a: " + "评" * 4)  # 7 + 12 bytes
    with pytest.raises(AGIEnvironmentError):
        parser.feed_line("agi_b: " + "评" * 5)  # 7 + 15 bytes


def test_nothing_is_fed_after_completion():
    parser = AGIEnvironmentParser()
    parser.feed_line("agi_request: x.py")
    parser.feed_line("")
    with pytest.raises(AGIEnvironmentError, match="already complete"):
        parser.feed_line("agi_x: y")


# --------------------------------------------------------------------------------------------
# Commands


@pytest.mark.parametrize(
    ("command", "text"),
    [
        (answer(), "ANSWER"),
        (hangup(), "HANGUP"),
        (channel_status(), "CHANNEL STATUS"),
        (stream_file("hcp/hcp-rating-invalid"), 'STREAM FILE hcp/hcp-rating-invalid ""'),
        (stream_file("demo-congrats", "12345"), 'STREAM FILE demo-congrats "12345"'),
        (stream_file("my prompts/menu", "#"), 'STREAM FILE "my prompts/menu" "#"'),
        (
            get_option("hcp/hcp-rating-menu", "0123456789*#", 5000),
            'GET OPTION hcp/hcp-rating-menu "0123456789*#" 5000',
        ),
        (wait_for_digit(5000), "WAIT FOR DIGIT 5000"),
        (wait_for_digit(-1), "WAIT FOR DIGIT -1"),
        (set_variable("HCP_RATING", "4"), 'SET VARIABLE HCP_RATING "4"'),
        (set_variable("COMMENT", "very good service"), 'SET VARIABLE COMMENT "very good service"'),
        (set_variable("NOTE", "服务很好"), 'SET VARIABLE NOTE "服务很好"'),
        (set_variable("Q", 'say "hi" \\o/'), 'SET VARIABLE Q "say \\"hi\\" \\\\o/"'),
        (set_variable("EMPTY", ""), 'SET VARIABLE EMPTY ""'),
        (get_variable("CHANNEL(linkedid)"), "GET VARIABLE CHANNEL(linkedid)"),
        (verbose("rating 2 stored"), 'VERBOSE "rating 2 stored" 1'),
        (verbose("caller gone", 3), 'VERBOSE "caller gone" 3'),
        (
            record_file("/var/spool/asterisk/hcp-comments/1795370432.48", "wav", "#", 60000, True, 3),
            'RECORD FILE /var/spool/asterisk/hcp-comments/1795370432.48 wav "#" 60000 0 BEEP s=3',
        ),
        (
            record_file("rating-comment-test", "wav", "#", 15000, beep=True, silence_s=4),
            'RECORD FILE rating-comment-test wav "#" 15000 0 BEEP s=4',  # fixture l
        ),
        (
            record_file("c", "gsm", "", 5000, beep=False),
            'RECORD FILE c gsm "" 5000 0',
        ),
    ],
)
def test_command_helpers_write_what_asterisk_expects(command, text):
    assert command.text == text
    assert command.to_bytes() == text.encode("utf-8") + b"\n"


@pytest.mark.parametrize(
    "build",
    [
        lambda: stream_file("x", "12a"),
        lambda: get_option("x", "1", -5),
        lambda: wait_for_digit(-2),
        lambda: wait_for_digit(1.5),  # type: ignore[arg-type]
        lambda: set_variable("TWO WORDS", "x"),
        lambda: set_variable('Q"', "x"),
        lambda: set_variable("X", "line\nbreak"),
        lambda: verbose("x", 0),
        lambda: record_file("x", "w a v", "#", 1000),
        lambda: record_file("x", "wav", "#", 1000, silence_s=0),
        lambda: AGICommand("NOOP\r"),
        lambda: AGICommand("NOOP\nHANGUP"),
        lambda: AGICommand(""),
        lambda: AGICommand("   "),
        lambda: AGICommand("NOOP \ud800"),
    ],
)
def test_unsafe_commands_are_refused_before_sending(build):
    with pytest.raises(AGILocalError):
        build()


def asterisk_parse_args(line: str) -> list[str]:
    """A transcription of ``parse_args`` in Asterisk's res_agi.c, to check our quoting."""
    args: list[str] = []
    current: list[str] | None = None
    quoted = escaped = False
    for ch in line:
        if ch == '"' and not escaped:
            quoted = not quoted
            if quoted and current is None:
                current = []
                args.append("")
            continue
        if ch in " \t" and not quoted and not escaped:
            if current is not None:
                args[-1] = "".join(current)
            current = None
            continue
        if ch == "\\" and not escaped:
            escaped = True
            continue
        if current is None:
            current = []
            args.append("")
        current.append(ch)
        escaped = False
    if current is not None:
        args[-1] = "".join(current)
    return args


def test_asterisk_parse_args_transcription_matches_the_fixtures():
    assert asterisk_parse_args('SET VARIABLE COMMENT "very good service"') == [
        "SET",
        "VARIABLE",
        "COMMENT",
        "very good service",
    ]
    assert asterisk_parse_args('STREAM FILE beep ""') == ["STREAM", "FILE", "beep", ""]


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\0")))
def test_quoted_values_reach_asterisk_unchanged(value):
    assert asterisk_parse_args(set_variable("X", value).text) == ["SET", "VARIABLE", "X", value]
    assert asterisk_parse_args("VERBOSE " + quote_argument(value) + " 1")[1] == value


@given(
    st.text(
        alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\0"),
        min_size=1,
    )
)
def test_file_names_reach_asterisk_unchanged(name):
    assert asterisk_parse_args(stream_file(name, "#").text) == ["STREAM", "FILE", name, "#"]


# --------------------------------------------------------------------------------------------
# The connection state machine

A_ENV = (
    b"agi_network: yes\n"
    b"agi_network_script: a-key-during-prompt?call_id=1795370432.48\n"
    b"agi_request: agi://127.0.0.1:4599/a-key-during-prompt?call_id=1795370432.48\n"
    b"agi_channel: Local/s@caller-sim-00000018;1\n"
    b"agi_language: en\n"
    b"agi_uniqueid: 1795370432.48\n"
    b"agi_callerid: 13800138000\n"
    b"agi_accountcode: \n"
    b"\n"
)


def ready_connection(**limits: int) -> AGIConnection:
    conn = AGIConnection(**limits)
    conn.receive_data(A_ENV)
    event = conn.next_event()
    assert isinstance(event, EnvironmentReady)
    assert event.request.params == {"call_id": "1795370432.48"}
    assert conn.state is ConnectionState.IDLE
    return conn


def drain(conn: AGIConnection) -> list[object]:
    return list(conn.events())


def test_environment_arrives_in_any_chunks():
    conn = AGIConnection()
    data = A_ENV.replace(b"en\n", "中文\n".encode())
    for index in range(len(data)):
        assert conn.next_event() is None
        conn.receive_data(data[index : index + 1])
    event = conn.next_event()
    assert isinstance(event, EnvironmentReady)
    assert event.request.language == "中文"
    assert conn.request is event.request


def events_of(chunks: list[bytes]) -> list[object]:
    conn = AGIConnection(max_line_length=200, max_environment_lines=8)
    for chunk in chunks:
        if chunk:  # b"" would be the end of input
            conn.receive_data(chunk)
    return [(type(e).__name__, getattr(e, "request", None), getattr(e, "reason", None)) for e in conn.events()]


ENV_LINE = st.one_of(
    st.sampled_from(["agi_request: x.py", "agi_arg_1: a=1", "agi_callerid: 138", "agi_language: 中文", "agi_x: "]),
    st.from_regex(r"agi_[a-z0-9_]{1,6}: [ -~评\r]{0,30}", fullmatch=True),
    st.sampled_from(["agi_bad", "agi_x:y", "GET / HTTP/1.1\r", "", "agi_y: " + "z" * 250, "HANGUP", "200 result=0"]),
)


@given(lines=st.lists(ENV_LINE, max_size=12), tail=st.sampled_from([b"", b"\n", b"\nHANGUP\n", b"\n200 result=0\n"]))
def test_an_environment_block_given_whole_reads_as_it_does_line_by_line(lines, tail):
    """The whole-block path is only a shortcut: same request, or the same error at the same line."""
    data = "".join(line + "\n" for line in lines).encode("utf-8") + tail
    whole = events_of([data])
    assert whole == events_of([data[i : i + 1] for i in range(len(data))])
    assert whole == events_of([data[:7], data[7:]])


def test_environment_parsed_whole_holds_every_line():
    conn = AGIConnection()
    conn.receive_data(A_ENV + b"HANGUP\n")
    ready, notice = drain(conn)
    assert isinstance(ready, EnvironmentReady) and isinstance(notice, HangupNotice)
    assert ready.request.env == dict(line.split(": ", 1) for line in A_ENV.decode().splitlines() if line)
    assert conn.state is ConnectionState.IDLE


def test_key_during_prompt_fixture_a():
    conn = ready_connection()
    assert conn.send_command(answer()) == b"ANSWER\n"
    conn.receive_data(b"200 result=0\n")
    (event,) = drain(conn)
    assert isinstance(event, CommandResponse) and event.command == answer()
    command = stream_file("demo-congrats", "12345")
    assert conn.send_command(command) == b'STREAM FILE demo-congrats "12345"\n'
    assert conn.state is ConnectionState.AWAITING_RESPONSE
    assert conn.outstanding == command
    conn.receive_data(b"200 result=50 endp")
    assert conn.next_event() is None
    conn.receive_data(b"os=13600\n")
    (event,) = drain(conn)
    assert isinstance(event, CommandResponse)
    assert key_from_result(event.response) == "2"
    assert event.response.endpos == 13600
    assert conn.state is ConnectionState.IDLE


def test_hangup_line_between_command_and_answer_is_not_the_answer():
    """Fixture n: the HANGUP line lands between SET VARIABLE and its ``200 result=1``."""
    conn = ready_connection()
    conn.send_command("SET VARIABLE RATING 4")
    conn.receive_data(b"HANGUP\n")
    assert drain(conn) == [HangupNotice()]
    assert conn.outstanding == AGICommand("SET VARIABLE RATING 4")
    conn.receive_data(b"200 result=1\n")
    (event,) = drain(conn)
    assert isinstance(event, CommandResponse)
    assert event.response.result == "1"


def test_hangup_line_without_a_command_is_a_notice():
    """Fixture a: Asterisk's own HANGUP line after the answer to our HANGUP command."""
    conn = ready_connection()
    conn.send_command(hangup())
    conn.receive_data(b"200 result=1\nHANGUP\n")
    events = drain(conn)
    assert isinstance(events[0], CommandResponse)
    assert events[1] == HangupNotice()
    assert conn.state is ConnectionState.IDLE


def test_usage_block_is_assembled_into_one_response():
    """Fixture i: WAIT FOR DIGIT without a timeout gets a 520 block."""
    conn = ready_connection()
    conn.send_command("WAIT FOR DIGIT")
    usage = (
        "Waits up to <replaceable>timeout</replaceable> milliseconds for channel to receive a "
        "DTMF digit. Returns <literal>-1</literal> on channel failure."
    )
    conn.receive_data(b"520-Invalid command syntax.  Proper usage follows:\n")
    assert conn.next_event() is None
    conn.receive_data(usage.encode() + b"\n")
    assert conn.next_event() is None
    conn.receive_data(b"520 End of proper usage.\n")
    (event,) = drain(conn)
    assert isinstance(event, CommandResponse)
    assert event.response.code == 520
    assert event.response.message == "Invalid command syntax.  Proper usage follows:"
    assert event.response.usage == (usage,)
    assert event.response.continues is False
    assert conn.state is ConnectionState.IDLE


def test_usage_block_has_a_line_limit():
    conn = ready_connection(max_block_lines=2)
    conn.send_command("WAIT FOR DIGIT")
    conn.receive_data(b"520-Invalid command syntax.  Proper usage follows:\na\nb\nc\n")
    (event,) = drain(conn)
    assert isinstance(event, ProtocolError)
    assert "more than 2 lines" in event.reason


def test_interim_100_line_is_skipped():
    conn = ready_connection()
    conn.send_command("GOSUB sub s 1")
    conn.receive_data(b"100 result=0 Trying...\n")
    assert conn.next_event() is None
    conn.receive_data(b"200 result=0 Gosub complete\n")
    (event,) = drain(conn)
    assert isinstance(event, CommandResponse)
    assert event.response.message == "Gosub complete"


def test_response_nobody_asked_for_is_a_protocol_error():
    conn = ready_connection()
    conn.receive_data(b"200 result=0\n")
    (event,) = drain(conn)
    assert isinstance(event, ProtocolError)
    assert conn.state is ConnectionState.ERROR
    conn.receive_data(b"HANGUP\n")  # ignored from now on
    assert conn.next_event() is None
    with pytest.raises(AGILocalError):
        conn.send_command(answer())


def test_garbled_response_is_a_protocol_error():
    conn = ready_connection()
    conn.send_command(answer())
    conn.receive_data(b"\x00\x01garbage\n")
    (event,) = drain(conn)
    assert isinstance(event, ProtocolError)
    assert "not an AGI response" in event.reason


def test_oversized_line_is_an_error_before_its_end_arrives():
    conn = ready_connection(max_line_length=100)
    conn.send_command(answer())
    conn.receive_data(b"200 result=" + b"1" * 200)
    (event,) = drain(conn)
    assert isinstance(event, ProtocolError)
    assert "longer than 100 bytes" in event.reason


def test_oversized_line_given_whole_is_an_error():
    conn = ready_connection(max_line_length=100)
    conn.send_command(answer())
    conn.receive_line("200 result=" + "1" * 200)
    (event,) = drain(conn)
    assert isinstance(event, ProtocolError)


def test_bad_environment_is_a_protocol_error_event():
    conn = AGIConnection(max_environment_lines=2)
    conn.receive_data(b"agi_a: 1\nagi_b: 2\nagi_c: 3\n\n")
    (event,) = drain(conn)
    assert isinstance(event, ProtocolError)
    assert "more than 2 lines" in event.reason


def test_health_check_connect_and_close_ends_cleanly():
    """A TCP connect-and-close must not spin (panoramisk 1.4 does): one event, then quiet."""
    conn = AGIConnection()
    conn.receive_data(b"")
    assert drain(conn) == [ConnectionClosed()]
    assert conn.state is ConnectionState.CLOSED
    conn.receive_data(b"")
    assert conn.next_event() is None
    with pytest.raises(AGILocalError):
        conn.send_command(answer())


def test_commands_before_the_environment_are_refused():
    conn = AGIConnection()
    conn.receive_data(b"agi_network: yes\n")
    with pytest.raises(AGILocalError, match="before the environment"):
        conn.send_command(answer())


def test_one_command_at_a_time():
    """Fixture p: a second command while STREAM FILE plays kills it with no answer at all."""
    conn = ready_connection()
    conn.send_command(stream_file("demo-congrats", "12345"))
    with pytest.raises(AGILocalError, match="one command at a time"):
        conn.send_command(verbose("pipelined"))
    assert conn.outstanding == stream_file("demo-congrats", "12345")


@pytest.mark.parametrize("text", ["NOOP\r", "NOOP\nHANGUP", "", "\n"])
def test_command_text_must_be_one_line(text):
    conn = ready_connection()
    with pytest.raises(AGILocalError):
        conn.send_command(text)
    assert conn.state is ConnectionState.IDLE


def test_receive_line_accepts_lines_with_or_without_newline():
    conn = ready_connection()
    conn.send_command(answer())
    conn.receive_line("200 result=0\n")
    conn.send_command(answer())
    conn.receive_line("200 result=0")
    assert [type(e) for e in drain(conn)] == [CommandResponse, CommandResponse]


def test_eof_with_a_command_outstanding_closes():
    """Fixture e3 (AGIEXITONHANGUP=yes): HANGUP, HANGUP, then Asterisk closes the socket."""
    conn = ready_connection()
    conn.send_command(stream_file("demo-congrats", "12345"))
    conn.receive_data(b"200 result=-1 endpos=16000\nHANGUP\nHANGUP\n")
    conn.receive_data(b"")
    events = drain(conn)
    assert [type(e) for e in events] == [
        CommandResponse,
        HangupNotice,
        HangupNotice,
        ConnectionClosed,
    ]
    assert events[0].response.failed


# --------------------------------------------------------------------------------------------
# Replaying whole transcripts through the connection


@needs_fixtures
@pytest.mark.parametrize("path", TRANSCRIPTS, ids=lambda p: p.stem)
def test_transcripts_replay_through_the_connection(path):
    """Each transcript, fed through AGIConnection, gives one answer per command in order.

    Commands our connection refuses to send (``NOOP\\r``, an empty line, a pipelined
    command) are checked to be refused; the answer Asterisk gave them is skipped, and a
    pipelined transcript (p) ends the replay there.
    """
    steps = load_transcript(path)
    environment, rest = split_environment(steps)
    conn = AGIConnection()
    conn.receive_data("".join(line + "\n" for line in environment).encode() + b"\n")
    (ready,) = drain(conn)
    assert isinstance(ready, EnvironmentReady)
    assert ready.request.network is ("agi_network: yes" in environment)

    sent: list[str] = []
    answered: list[str] = []
    hangups = expected_hangups = 0
    skip_answer = False
    block_code: int | None = None
    for step in rest:
        if step.direction == ">>":
            try:
                conn.send_command(step.text)
            except AGILocalError:
                if conn.outstanding is not None:  # pipelined: the transcript diverges here
                    assert path.stem.startswith("p-")
                    return
                skip_answer = True  # the 510 Asterisk gave to NOOP\r or the empty line
                continue
            sent.append(step.text)
        elif step.direction == "<<":
            if skip_answer:
                skip_answer = False
                continue
            if step.text == "HANGUP" and block_code is None:
                expected_hangups += 1
            if block_code is None and step.text.startswith("520-"):
                block_code = 520
            elif block_code is not None and step.text.startswith("520 "):
                block_code = None
            conn.receive_data(step.text.encode("utf-8") + b"\n")
        elif "EOF" in step.text:
            conn.receive_data(b"")
        for event in drain(conn):
            assert not isinstance(event, ProtocolError), event
            if isinstance(event, CommandResponse):
                answered.append(event.command.text)
            elif isinstance(event, HangupNotice):
                hangups += 1
    assert answered == sent
    assert hangups == expected_hangups
    assert conn.outstanding is None


def test_long_identifiers_are_shortened_apart_and_alike() -> None:
    """Two call ids differing only past 64 characters stay two calls (R1.4); the same id maps alike."""
    from gateway.ivr.call import hand_off_from_request

    def hand_off(call_id: str) -> dict[str, str | None]:
        return hand_off_from_request(parse_environment(["agi_request: gateway-agi", f"agi_arg_1: call_id={call_id}"]))

    first, second = "C" * 70 + "-1", "C" * 70 + "-2"
    assert hand_off(first)["call_id"] != hand_off(second)["call_id"]
    assert hand_off(first)["call_id"] == hand_off(first)["call_id"]
    assert all(len(hand_off(x)["call_id"] or "") == 64 for x in (first, second))
    assert hand_off("1795370500.1")["call_id"] == "1795370500.1"
