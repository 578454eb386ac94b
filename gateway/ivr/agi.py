"""The AGI wire protocol, sans-I/O: lines in, events out; commands in, bytes out.

Asterisk's AGI (classic over stdin/stdout, FastAGI over TCP) is a line protocol: an
environment block of ``agi_name: value`` lines ended by an empty line, then one command from
the program answered by one response from Asterisk (``200 result=… (…) endpos=…``, ``510 …``,
a ``520-`` … ``520 …`` block), with an asynchronous ``HANGUP`` line that may arrive anywhere.
This module owns that protocol and nothing else (no sockets, threads, clocks or logging), so
the FastAGI listener, the classic-AGI entry point and the Asterisk simulator all share one
tested reading of the wire. The rules come from the transcripts of a real Asterisk in
``fixtures/agi`` (see its README); pyst2, starpy and panoramisk all take the ``HANGUP`` line for
a command's answer and stay one line out of step for the rest of the call (SPEC R2.4): here it
is a separate event and never an answer.

Typical use (the adapter)::

    conn = AGIConnection()
    conn.receive_data(data)             # whatever arrived, partial lines are kept
    while (event := conn.next_event()) is not None:
        ...                             # EnvironmentReady, CommandResponse, HangupNotice, ...
    transport.write(conn.send_command(stream_file("hcp/hcp-rating-menu", "12345")))
"""

from __future__ import annotations

import enum
import functools
import re
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from urllib.parse import unquote

#: Defaults for the limits; a deployment can pass others to the parser and the connection.
MAX_LINE_LENGTH = 8192
MAX_ENVIRONMENT_LINES = 256
MAX_BLOCK_LINES = 256

#: The DTMF keys a key-reading command can report, by ASCII code (``result=50`` is ``2``).
DTMF_KEYS = "0123456789*#ABCD"
_KEY_BY_CODE = {ord(key): key for key in DTMF_KEYS}


# --------------------------------------------------------------------------------------------
# Errors


class AGIProtocolError(Exception):
    """Something on the AGI wire (or about to go on it) breaks the protocol."""


class AGIEnvironmentError(AGIProtocolError):
    """The ``agi_*`` environment block Asterisk sent first is malformed or too large."""


class AGIResponseError(AGIProtocolError):
    """A line from Asterisk is not a response, a usage line or ``HANGUP``, or came unasked."""


class AGILocalError(AGIProtocolError):
    """The program misused the connection: a bad command text, or a command out of turn.

    Like h11's ``LocalProtocolError``: a bug in our code, raised at once rather than sent.
    """


# --------------------------------------------------------------------------------------------
# The environment block


@dataclass(frozen=True)
class AGIRequest:
    """The environment Asterisk sends before the first command, parsed once.

    ``env`` keeps every line exactly as received, keyed by its full name *with* the ``agi_``
    prefix (``env["agi_channel"]``), so it greps like Asterisk's documentation and the
    fixtures. The other fields are derived from it:

    - ``network``: ``agi_network: yes`` (FastAGI); classic AGI has no such line.
    - ``script``: FastAGI: the path part of ``agi_network_script`` (everything after
      ``host:port/`` up to ``?``); classic AGI: ``agi_request``, the script name as written.
    - ``params``: the URL query of ``agi_network_script`` (``&``-separated, percent-decoded as
      UTF-8; ``+`` stays ``+`` because Asterisk's ``URIENCODE`` writes a space as ``%20``),
      then every ``agi_arg_N`` in order: one that starts with ``?`` is a query string,
      decoded as the URL's (``AGI(gateway-agi,?call_id=${URIENCODE(...)}&...)``: classic AGI
      has no URL, and Asterisk splits arguments at commas and strips quotes and backslashes,
      which ``URIENCODE`` escapes); any other of the form ``key=value`` is taken raw, not
      decoded. A later source wins over an earlier one for the same key, and within a query a
      repeated key keeps its last value.
    - ``args``: every ``agi_arg_N`` in order of N, raw (empty ones too).
    - ``caller_id``: ``agi_callerid``, or None when Asterisk says ``unknown`` or nothing.

    Personal data (the caller's number, arguments) is left out of ``repr`` (SPEC R5.1).
    """

    env: Mapping[str, str] = field(repr=False)
    network: bool
    script: str
    params: Mapping[str, str] = field(repr=False)
    args: tuple[str, ...] = field(repr=False)
    unique_id: str
    caller_id: str | None = field(repr=False)
    channel: str
    language: str

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> AGIRequest:
        """Derive the request from ``agi_*`` lines; missing lines give empty strings."""
        env = MappingProxyType(dict(env))
        network = env.get("agi_network", "").strip().lower() == "yes"
        if network or "agi_network_script" in env:
            path, _, query = env.get("agi_network_script", "").partition("?")
        else:
            path, query = env.get("agi_request", ""), ""
        args = _arguments(env)
        params = dict(_query_params(query))
        for arg in args:
            if arg.startswith("?"):
                params.update(_query_params(arg[1:]))
                continue
            key, sep, value = arg.partition("=")
            if sep and _PARAM_KEY.fullmatch(key):
                params[key] = value
        caller_id = env.get("agi_callerid", "")
        return cls(
            env=env,
            network=network,
            script=path,
            params=MappingProxyType(params),
            args=args,
            unique_id=env.get("agi_uniqueid", ""),
            caller_id=None if caller_id.strip().lower() in ("", "unknown") else caller_id,
            channel=env.get("agi_channel", ""),
            language=env.get("agi_language", ""),
        )


_ENV_KEY = re.compile(r"agi_[A-Za-z0-9_]+")
#: A block of well-formed ``agi_<name>: <value>`` lines, each ending in ``\n`` (no ``\r``).
_ENV_BLOCK = re.compile(r"(?:agi_[A-Za-z0-9_]+: [^\r\n]*\n)+")
_ARG_KEY = re.compile(r"agi_arg_([0-9]+)")
_PARAM_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


def _arguments(env: Mapping[str, str]) -> tuple[str, ...]:
    numbered = [
        (int(key[8:]), value)
        for key, value in env.items()
        if key.startswith("agi_arg_") and _ARG_KEY.fullmatch(key)  # the test first: most keys are not arguments
    ]
    numbered.sort()
    return tuple(value for _, value in numbered)


def _query_params(query: str) -> Iterator[tuple[str, str]]:
    for part in query.split("&"):
        if not part:
            continue
        key, _, value = part.partition("=")
        yield (
            unquote(key, encoding="utf-8", errors="replace"),
            unquote(value, encoding="utf-8", errors="replace"),
        )


class AGIEnvironmentParser:
    """Reads the environment block line by line; complete at the first empty line.

    Limits bound what a stray client (a port scan, a health check, a wrong peer) can make us
    hold: at most ``max_lines`` variable lines of at most ``max_line_length`` bytes (UTF-8)
    each. Every line must be ``agi_<name>: <value>`` (the value may be empty, as in
    ``agi_accountcode: ``); a name may appear once. Anything else raises
    :class:`AGIEnvironmentError`, so a connection from something that is not Asterisk fails at
    once with a sentence instead of waiting or spinning (panoramisk 1.4 spins on an early EOF).
    """

    def __init__(
        self,
        *,
        max_lines: int = MAX_ENVIRONMENT_LINES,
        max_line_length: int = MAX_LINE_LENGTH,
    ) -> None:
        self.max_lines = max_lines
        self.max_line_length = max_line_length
        self._env: dict[str, str] = {}
        self.request: AGIRequest | None = None

    @property
    def complete(self) -> bool:
        return self.request is not None

    def feed_block(self, block: bytes) -> AGIRequest | None:
        """Take a whole block at once (its lines, each ending in ``\n``, without the empty line).

        The common case on every call, in one pass: a well-formed block from Asterisk. Returns
        None, having taken nothing, when the block is not plainly well-formed (a ``\r``, a bad
        or repeated name, a line too long, too many lines, lines already fed): the caller then
        feeds it line by line, and :meth:`feed_line` says what is wrong.
        """
        if (
            self.request is not None
            or self._env
            or len(block) > self.max_line_length
            or block.count(b"\n") > self.max_lines
        ):
            return None
        text = block.decode("utf-8", errors="replace")
        if not _ENV_BLOCK.fullmatch(text):
            return None
        lines = text.split("\n")
        lines.pop()  # the block ends with "\n"
        env = dict(line.split(": ", 1) for line in lines)
        if len(env) != len(lines):  # a name given twice
            return None
        self._env = env
        self.request = AGIRequest.from_env(env)
        return self.request

    def feed_line(self, line: str) -> AGIRequest | None:
        """Take one line (its ``\\n`` removed); return the request once the block is complete."""
        if self.request is not None:
            raise AGIEnvironmentError("the AGI environment block is already complete")
        if _longer_than(line, self.max_line_length):
            raise AGIEnvironmentError(
                f"an AGI environment line is longer than {self.max_line_length} bytes; is the peer really Asterisk?"
            )
        if line == "":
            if not self._env:
                raise AGIEnvironmentError(
                    "the AGI environment block is empty: the peer sent an empty line first; is it really Asterisk?"
                )
            self.request = AGIRequest.from_env(self._env)
            return self.request
        if len(self._env) >= self.max_lines:
            raise AGIEnvironmentError(f"the AGI environment block has more than {self.max_lines} lines")
        key, sep, value = line.partition(": ")
        if not sep:
            raise AGIEnvironmentError(f"AGI environment line {_excerpt(line)} is not 'agi_<name>: <value>'")
        if not _ENV_KEY.fullmatch(key):
            raise AGIEnvironmentError(f"AGI environment line {_excerpt(key)} does not start with an agi_ name")
        if key in self._env:
            raise AGIEnvironmentError(f"AGI environment variable {key} appears twice")
        self._env[key] = value
        return None


# --------------------------------------------------------------------------------------------
# Responses


@dataclass(frozen=True)
class Response:
    """One answer of Asterisk to one command (a 520 block is assembled into one).

    ``result`` is the text after ``result=`` (None when the line has none, as for 510/511/520);
    ``data`` is the parenthesised part (``timeout``, ``dtmf``, a variable's value);
    ``endpos`` the offset reached by STREAM FILE, GET OPTION, RECORD FILE (samples) or
    CONTROL STREAM FILE (milliseconds); ``extras`` any other ``key=value`` pairs;
    ``message`` free text (``Gosub complete``; the text of a 510/511/520). ``usage`` holds the
    middle lines of a 520 block. ``continues`` is True only for what :func:`parse_response`
    returns for the first line of a multi-line block (``520-…``). ``line`` is the first line as
    received; it can hold personal data (a variable's value), so it is kept out of ``repr``.
    """

    code: int
    result: str | None = None
    data: str | None = None
    endpos: int | None = None
    extras: tuple[tuple[str, str], ...] = ()
    message: str = ""
    usage: tuple[str, ...] = ()
    continues: bool = False
    line: str = field(default="", repr=False)

    @property
    def ok(self) -> bool:
        """The command was executed (code 200); ``result`` then says how it went."""
        return self.code == 200

    @property
    def dead_channel(self) -> bool:
        """511: the channel is gone (hung up); only variable and VERBOSE commands still work."""
        return self.code == 511

    @property
    def result_int(self) -> int | None:
        """``result`` as an integer, or None when it is absent or not a number (GET DATA)."""
        if self.result is None or not _INTEGER.fullmatch(self.result):
            return None
        return int(self.result)

    @property
    def failed(self) -> bool:
        """``200 result=-1``: a hang-up *or* a failure such as a missing prompt file."""
        return self.ok and self.result == "-1"


@dataclass(frozen=True)
class HangupNotice:
    """Asterisk's unasked ``HANGUP`` line: the channel is gone (or the session is ending).

    It arrives about 40 ms after Asterisk notices the hang-up, whether or not a command is
    outstanding, and also after the program's own HANGUP command or half-close. It is never a
    command's answer (SPEC R2.4). Classic AGI gets the signal SIGHUP instead; its adapter
    turns that into this same event.
    """


_INTEGER = re.compile(r"-?[0-9]+")
_CODE_LINE = re.compile(r"(?P<code>[1-5][0-9][0-9])(?P<sep>[ -])(?P<rest>.*)", re.DOTALL)
_RESULT = re.compile(
    r"result=(?P<result>\S*)"
    r"(?: \((?P<data>.*)\))?"
    r"(?P<pairs>(?: [A-Za-z_]+=\S*)*)"
    r"(?: (?P<text>.*))?",
    re.DOTALL,
)
_PAIR = re.compile(r" ([A-Za-z_]+)=(\S*)")
_SIMPLE_200 = re.compile(r"200 result=(-?[0-9]+)(?: endpos=([0-9]+))?")


def parse_response(line: str) -> Response | HangupNotice:
    """Parse one line from Asterisk after the environment (cf. panoramisk's ``parse_agi_result``).

    Real lines (``fixtures/agi``, Asterisk GIT-master-f0c1c1a7b7)::

        200 result=50 endpos=13600       key 2 stopped STREAM FILE: result "50", endpos 13600
        200 result=0 endpos=3404         the prompt played out, no key
        200 result= (timeout)            GET DATA, no key: result "", data "timeout"
        200 result=56 (timeout)          GET DATA stopped by the timeout after 5 and 6
        200 result=1 (very good service) GET VARIABLE: the value, spaces included, is data
        200 result=35 (dtmf) endpos=42518  RECORD FILE ended by #
        200 result=-1 endpos=0           hang-up, or the prompt file does not exist
        200 result=0 Gosub complete      free text after the result goes to message
        100 result=0 Trying...           interim line of a GOSUB (not the final answer)
        510 Invalid or unknown command
        511 Command Not Permitted on a dead channel or intercept routine
        520-Invalid command syntax.  Proper usage follows:   (continues=True; usage lines
        520 End of proper usage.                              follow, then this line)
        HANGUP                           asynchronous hang-up notice, not a response

    Raises :class:`AGIResponseError` for anything else. A trailing ``\\r`` is ignored.
    """
    simple = _SIMPLE_200.fullmatch(line)
    if simple is not None:  # most answers: "200 result=N" or "200 result=N endpos=M"
        endpos = simple.group(2)
        return Response(code=200, result=simple.group(1), endpos=None if endpos is None else int(endpos), line=line)
    return _parse_any_response(line)


def _parse_any_response(line: str) -> Response | HangupNotice:
    """:func:`parse_response` for every form of line."""
    text = line[:-1] if line.endswith("\r") else line
    if text == "HANGUP":
        return HangupNotice()
    match = _CODE_LINE.fullmatch(text)
    if match is None:
        raise AGIResponseError(f"the line {_excerpt(text)} from Asterisk is not an AGI response")
    code = int(match.group("code"))
    continues = match.group("sep") == "-"
    rest = match.group("rest")
    if not rest.startswith("result="):
        if code == 200:
            raise AGIResponseError(f"the 200 response {_excerpt(text)} has no result=")
        return Response(code=code, message=rest, continues=continues, line=line)
    parsed = _RESULT.fullmatch(rest)
    if parsed is None:  # pragma: no cover - the pattern accepts every 'result=' line
        raise AGIResponseError(f"the line {_excerpt(text)} from Asterisk is not an AGI response")
    endpos: int | None = None
    extras: list[tuple[str, str]] = []
    for key, value in _PAIR.findall(parsed.group("pairs")):
        if key == "endpos":
            if not _INTEGER.fullmatch(value):
                raise AGIResponseError(f"endpos={_excerpt(value)} is not a number")
            endpos = int(value)
        else:
            extras.append((key, value))
    return Response(
        code=code,
        result=parsed.group("result"),
        data=parsed.group("data"),
        endpos=endpos,
        extras=tuple(extras),
        message=parsed.group("text") or "",
        continues=continues,
        line=line,
    )


def key_from_result(response: Response) -> str | None:
    """The DTMF key a key-reading command reports, or None for ``result=0`` (no key).

    STREAM FILE, GET OPTION, WAIT FOR DIGIT, CONTROL STREAM FILE and RECORD FILE report a
    key as its ASCII code: ``50`` → ``"2"``, ``35`` → ``"#"``, ``42`` → ``"*"``. GET DATA does
    not (it returns the digits as text) and must not be read with this function. A failure
    (``result=-1``), an error response, or a code that is no DTMF key (``result=1`` from a
    pipelined command, fixture p) raises :class:`AGIResponseError`: the caller decides first
    what a failure means (SPEC R2.4).
    """
    value = response.result_int
    if not response.ok or value is None:
        raise AGIResponseError(f"response {response.code} {response.result!r} carries no key")
    if value == 0:
        return None
    if value < 0:
        raise AGIResponseError("result=-1: the channel hung up or the command failed")
    key = _KEY_BY_CODE.get(value)
    if key is None:
        raise AGIResponseError(f"result={value} is not the ASCII code of a DTMF key")
    return key


# --------------------------------------------------------------------------------------------
# Commands


@dataclass(frozen=True)
class AGICommand:
    """One command line, without its ``\\n``; checked so that it is exactly one line.

    A ``\\r`` would become part of the last word (``NOOP\\r`` → 510, fixture i) and a ``\\n``
    would make two commands, so both are refused here, before anything is sent.
    """

    text: str

    def __post_init__(self) -> None:
        if not self.text.strip():
            raise AGILocalError("an AGI command cannot be empty (Asterisk answers 510)")
        if "\r" in self.text or "\n" in self.text or "\0" in self.text:
            raise AGILocalError(
                f"AGI command {_excerpt(self.text)} contains a line break or NUL; "
                "quote values with the command helpers instead"
            )
        try:
            self.text.encode("utf-8")
        except UnicodeEncodeError:
            raise AGILocalError(f"AGI command {_excerpt(self.text)} cannot be encoded as UTF-8") from None

    def to_bytes(self) -> bytes:
        """The wire form: UTF-8, terminated by exactly one ``\\n`` (never ``\\r\\n``)."""
        return self.text.encode("utf-8") + b"\n"


@functools.lru_cache(maxsize=256)
def _checked_command(text: str) -> AGICommand:
    """The command for ``text``, checked once: a dialogue sends the same few texts on every call."""
    return AGICommand(text)


def quote_argument(value: str) -> str:
    """Quote a value the way Asterisk's ``parse_args`` (res_agi.c) unquotes it.

    Inside double quotes a space is kept; a backslash escapes the next character, so ``\\``
    and ``"`` are written ``\\\\`` and ``\\"``. ``""`` is an empty argument. Line breaks cannot
    be quoted at all and are refused by :class:`AGICommand`.
    """
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


_BARE_WORD = re.compile(r'[^\s"\\]+')
_VARIABLE_NAME = re.compile(r'[^\s"\\]+')


def _word(value: str) -> str:
    """A file name or path as one argument: bare when safe, quoted otherwise."""
    return value if _BARE_WORD.fullmatch(value) else quote_argument(value)


def _digits(escape_digits: str) -> str:
    bad = sorted({ch for ch in escape_digits if ch not in DTMF_KEYS})
    if bad:
        raise AGILocalError(f"escape digits {escape_digits!r} contain {''.join(bad)!r}; only {DTMF_KEYS} are DTMF keys")
    return quote_argument(escape_digits)


def _milliseconds(value: int, what: str, *, allow_forever: bool = False) -> str:
    if isinstance(value, bool) or not isinstance(value, int):
        raise AGILocalError(f"{what} must be an integer number of milliseconds, not {value!r}")
    if value < 0 and not (allow_forever and value == -1):
        raise AGILocalError(f"{what} must not be negative, got {value}")
    return str(value)


def _variable(name: str) -> str:
    if not _VARIABLE_NAME.fullmatch(name):
        raise AGILocalError(f"channel variable name {name!r} must be one word without quotes or backslashes")
    return name


def answer() -> AGICommand:
    """``ANSWER``: answers ``200 result=0``, ``-1`` on failure, 511 after a hang-up."""
    return AGICommand("ANSWER")


def hangup() -> AGICommand:
    """``HANGUP``: Asterisk answers ``200 result=1`` and then sends its own ``HANGUP`` line."""
    return AGICommand("HANGUP")


def channel_status() -> AGICommand:
    """``CHANNEL STATUS``: ``200 result=6`` when up; 511 once the caller has hung up.

    It tells a missing prompt file from a hang-up after an ambiguous ``result=-1`` (fixture h).
    """
    return AGICommand("CHANNEL STATUS")


def stream_file(name: str, escape_digits: str = "") -> AGICommand:
    """``STREAM FILE name "digits"``: only the listed keys interrupt; others are swallowed."""
    return AGICommand(f"STREAM FILE {_word(name)} {_digits(escape_digits)}")


def get_option(name: str, escape_digits: str, timeout_ms: int) -> AGICommand:
    """``GET OPTION name "digits" ms``: the prompt and the wait for a key in one command.

    No gap between prompt and wait, so no key is lost between two commands (fixtures q, r).
    """
    timeout = _milliseconds(timeout_ms, "GET OPTION timeout")
    return AGICommand(f"GET OPTION {_word(name)} {_digits(escape_digits)} {timeout}")


def wait_for_digit(timeout_ms: int) -> AGICommand:
    """``WAIT FOR DIGIT ms`` (``-1`` waits forever)."""
    return AGICommand(f"WAIT FOR DIGIT {_milliseconds(timeout_ms, 'WAIT FOR DIGIT timeout', allow_forever=True)}")


def set_variable(name: str, value: str) -> AGICommand:
    """``SET VARIABLE name "value"``, the value quoted and escaped (UTF-8 passes as is).

    It still answers 200 after a hang-up, so a received key can always reach the dialplan.
    """
    return AGICommand(f"SET VARIABLE {_variable(name)} {quote_argument(value)}")


def get_variable(name: str) -> AGICommand:
    """``GET VARIABLE name``: ``200 result=1 (value)``, or ``200 result=0`` when unset."""
    return AGICommand(f"GET VARIABLE {_variable(name)}")


def verbose(message: str, level: int = 1) -> AGICommand:
    """``VERBOSE "message" level`` (level 1–4) to Asterisk's console; never personal data."""
    if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= 4:
        raise AGILocalError(f"VERBOSE level must be 1 to 4, got {level!r}")
    return AGICommand(f"VERBOSE {quote_argument(message)} {level}")


def record_file(
    path: str,
    fmt: str,
    escape_digits: str,
    timeout_ms: int,
    beep: bool = True,
    silence_s: int | None = None,
) -> AGICommand:
    """``RECORD FILE path fmt "digits" ms 0 [BEEP] [s=N]``; Asterisk appends ``.fmt`` to path.

    The sample offset ``0`` is always written: Asterisk beeps whenever the sixth argument is
    not a number, so ``… ms s=3`` would beep even without BEEP. ``timeout_ms`` is the maximum
    length (``-1``: none); ``silence_s`` ends the recording after that many seconds of silence
    (trimmed by Asterisk). The answer is ``200 result=35 (dtmf) endpos=…`` when a key ended it,
    ``200 result=0 (timeout) endpos=…`` otherwise, ``result=-1`` on hang-up or write failure.
    """
    if not re.fullmatch(r"[A-Za-z0-9]+", fmt):
        raise AGILocalError(f"recording format {fmt!r} must be a word such as wav or gsm")
    parts = [
        "RECORD FILE",
        _word(path),
        fmt,
        _digits(escape_digits),
        _milliseconds(timeout_ms, "RECORD FILE timeout", allow_forever=True),
        "0",
    ]
    if beep:
        parts.append("BEEP")
    if silence_s is not None:
        if isinstance(silence_s, bool) or not isinstance(silence_s, int) or silence_s < 1:
            raise AGILocalError(f"silence must be a whole number of seconds ≥ 1, not {silence_s!r}")
        parts.append(f"s={silence_s}")
    return AGICommand(" ".join(parts))


# --------------------------------------------------------------------------------------------
# The connection state machine


@dataclass(frozen=True)
class EnvironmentReady:
    """The environment block is complete; commands may be sent from now on."""

    request: AGIRequest


@dataclass(frozen=True)
class CommandResponse:
    """The answer to the one outstanding command (a 520 block assembled into one)."""

    command: AGICommand
    response: Response


@dataclass(frozen=True)
class ProtocolError:
    """Asterisk (or whatever the peer is) broke the protocol; the connection is now unusable.

    The adapter should close the socket. For FastAGI that ends the AGI() with success and the
    dialplan goes on, so a rating dialogue that has a key must still store it (SPEC R2.4).
    """

    reason: str


@dataclass(frozen=True)
class ConnectionClosed:
    """End of input (``receive_data(b"")`` or :meth:`AGIConnection.receive_eof`)."""


Event = EnvironmentReady | CommandResponse | HangupNotice | ProtocolError | ConnectionClosed


class ConnectionState(enum.Enum):
    """Where one AGI session stands, from the program's side."""

    ENVIRONMENT = "environment"  # reading agi_* lines
    IDLE = "idle"  # ready for a command
    AWAITING_RESPONSE = "awaiting_response"  # one command outstanding
    CLOSED = "closed"  # end of input seen
    ERROR = "error"  # the peer broke the protocol


class AGIConnection:
    """One AGI session on the program's side, as an explicit state machine (h11 style).

    ``receive_data``/``receive_line`` feed what Asterisk sent; ``next_event`` hands back typed
    events in order; ``send_command`` returns the bytes to write. The rules:

    - One command at a time: a second command while one is outstanding raises
      :class:`AGILocalError` (a line written during STREAM FILE kills the prompt with no answer
      at all, fixture p). So does a command before the environment, after an error or EOF.
    - ``HANGUP`` lines are accepted anywhere after the environment, even between a command
      and its answer (fixture n), and become :class:`HangupNotice`, never an answer.
    - A ``100`` line (GOSUB's ``Trying...``) is interim and skipped; a ``NNN-`` line opens a
      block that ends at ``NNN text`` and is delivered as one :class:`Response`.
    - A remote violation (garbage, a response nobody asked for, an over-long line, a bad
      environment) gives one :class:`ProtocolError` event and the ``ERROR`` state, in which
      further input is ignored. Nothing here raises because of what the peer sent.
    """

    def __init__(
        self,
        *,
        max_line_length: int = MAX_LINE_LENGTH,
        max_environment_lines: int = MAX_ENVIRONMENT_LINES,
        max_block_lines: int = MAX_BLOCK_LINES,
    ) -> None:
        self.max_line_length = max_line_length
        self.max_block_lines = max_block_lines
        self._environment = AGIEnvironmentParser(max_lines=max_environment_lines, max_line_length=max_line_length)
        self._state = ConnectionState.ENVIRONMENT
        self._buffer = bytearray()
        self._events: deque[Event] = deque()
        self._outstanding: AGICommand | None = None
        self._block: Response | None = None
        self._block_lines: list[str] = []

    @property
    def state(self) -> ConnectionState:
        return self._state

    @property
    def request(self) -> AGIRequest | None:
        """The parsed environment, once :class:`EnvironmentReady` has been produced."""
        return self._environment.request

    @property
    def outstanding(self) -> AGICommand | None:
        """The command sent and not yet answered, if any."""
        return self._outstanding

    # -- input -------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes as they arrived; ``b""`` means end of input (as in h11).

        Lines end at ``\\n``; a partial line is kept until the rest arrives. Each line is
        decoded as UTF-8 with replacement characters, so no byte sequence can crash us.
        """
        if not data:
            self.receive_eof()
            return
        if self._state in (ConnectionState.ERROR, ConnectionState.CLOSED):
            return
        self._buffer += data
        if self._state is ConnectionState.ENVIRONMENT:
            self._take_environment_block()
        if b"\n" in data:
            *lines, rest = self._buffer.split(b"\n")
            self._buffer = rest  # what follows the last complete line; a failure drops it
            for raw in lines:
                if len(raw) > self.max_line_length:
                    self._fail(f"a line from Asterisk is longer than {self.max_line_length} bytes")
                    return
                self._line(raw.decode("utf-8", errors="replace"))
                if self._state is ConnectionState.ERROR:
                    return
        if len(self._buffer) > self.max_line_length:
            self._fail(f"a line from Asterisk is longer than {self.max_line_length} bytes")

    def _take_environment_block(self) -> None:
        """Parse the environment block in one go once it is all here: it nearly always comes
        in one segment, and one pass over it is a fraction of the cost of 20-odd lines fed one
        by one. A block not plainly well-formed, or not complete yet, is left to the
        line-by-line path, which gives the precise error at the first bad line."""
        end = self._buffer.find(b"\n\n")
        if end < 0:
            return
        request = self._environment.feed_block(bytes(self._buffer[: end + 1]))
        if request is None:
            return
        del self._buffer[: end + 2]
        self._state = ConnectionState.IDLE
        self._events.append(EnvironmentReady(request))

    def receive_line(self, line: str) -> None:
        """Feed one line already split off (a trailing ``\\n``, if any, is removed)."""
        if self._state in (ConnectionState.ERROR, ConnectionState.CLOSED):
            return
        if line.endswith("\n"):
            line = line[:-1]
        if "\n" in line:
            self._fail("receive_line was given more than one line")
            return
        if _longer_than(line, self.max_line_length):
            self._fail(f"a line from Asterisk is longer than {self.max_line_length} bytes")
            return
        self._line(line)

    def receive_eof(self) -> None:
        """The peer closed the connection; a partial line left in the buffer is dropped."""
        if self._state is ConnectionState.CLOSED:
            return
        self._buffer.clear()
        self._outstanding = None
        self._state = ConnectionState.CLOSED
        self._events.append(ConnectionClosed())

    def next_event(self) -> Event | None:
        """The next event, or None when more input is needed."""
        return self._events.popleft() if self._events else None

    def events(self) -> Iterator[Event]:
        """Every event available now, in order."""
        while self._events:
            yield self._events.popleft()

    # -- output ------------------------------------------------------------------------------

    def send_command(self, command: AGICommand | str) -> bytes:
        """Record ``command`` as outstanding and return its bytes to write.

        Raises :class:`AGILocalError` when it may not be sent now (see the class docstring)
        or when the text is not a single line.
        """
        if isinstance(command, str):
            command = _checked_command(command)
        if self._state is ConnectionState.ENVIRONMENT:
            raise AGILocalError("no AGI command may be sent before the environment is complete")
        if self._state is ConnectionState.AWAITING_RESPONSE:
            assert self._outstanding is not None
            raise AGILocalError(
                f"AGI command {_excerpt(command.text)} sent while "
                f"{_excerpt(self._outstanding.text)} is unanswered; one command at a time"
            )
        if self._state is not ConnectionState.IDLE:
            raise AGILocalError(f"the AGI connection is {self._state.value}; no command may be sent")
        self._outstanding = command
        self._state = ConnectionState.AWAITING_RESPONSE
        return command.to_bytes()

    # -- internals ---------------------------------------------------------------------------

    def _fail(self, reason: str) -> None:
        self._state = ConnectionState.ERROR
        self._buffer.clear()
        self._outstanding = None
        self._events.append(ProtocolError(reason))

    def _line(self, line: str) -> None:
        if line.endswith("\r"):
            line = line[:-1]
        if self._state is ConnectionState.ENVIRONMENT:
            try:
                request = self._environment.feed_line(line)
            except AGIProtocolError as exc:
                self._fail(str(exc))
                return
            if request is not None:
                self._state = ConnectionState.IDLE
                self._events.append(EnvironmentReady(request))
            return
        if self._block is not None:
            self._block_line(line)
            return
        try:
            parsed = parse_response(line)
        except AGIProtocolError as exc:
            self._fail(str(exc))
            return
        if isinstance(parsed, HangupNotice):
            self._events.append(parsed)
            return
        if self._outstanding is None:
            self._fail(f"Asterisk sent a {parsed.code} response while no command was outstanding")
            return
        if parsed.code == 100:  # interim (GOSUB 'Trying...'); the final answer follows
            return
        if parsed.continues:
            self._block = parsed
            self._block_lines = []
            return
        self._answer(parsed)

    def _block_line(self, line: str) -> None:
        assert self._block is not None
        first = self._block
        match = _CODE_LINE.fullmatch(line)
        if match and int(match.group("code")) == first.code and match.group("sep") == " ":
            usage = tuple(self._block_lines)
            self._block = None
            self._block_lines = []
            self._answer(
                Response(
                    code=first.code,
                    result=first.result,
                    data=first.data,
                    endpos=first.endpos,
                    extras=first.extras,
                    message=first.message,
                    usage=usage,
                    line=first.line,
                )
            )
            return
        if line == "HANGUP":
            self._events.append(HangupNotice())
            return
        if len(self._block_lines) >= self.max_block_lines:
            self._fail(f"a {first.code} block from Asterisk has more than {self.max_block_lines} lines")
            return
        self._block_lines.append(line)

    def _answer(self, response: Response) -> None:
        assert self._outstanding is not None
        command, self._outstanding = self._outstanding, None
        self._state = ConnectionState.IDLE
        self._events.append(CommandResponse(command, response))


def _longer_than(line: str, limit: int) -> bool:
    """Whether ``line`` takes more than ``limit`` bytes in UTF-8 (encoded only when it might)."""
    return len(line) * 4 > limit and len(line.encode("utf-8", errors="replace")) > limit


_DIGIT_RUN = re.compile(r"[0-9]{5,}")


def _excerpt(text: str, limit: int = 40) -> str:
    """A short, masked repr for error messages (they end up in logs).

    Enough to recognise what the peer sent (``'GET / HTTP/1.1'``), but runs of five or more
    digits are masked so that no phone or ID number reaches a log (SPEC R5.1).
    """
    short = text if len(text) <= limit else text[:limit] + "…"
    return repr(_DIGIT_RUN.sub(lambda m: "#" * len(m.group()), short))
