"""A simulated Asterisk for tests and benchmarks: plays Asterisk's side of AGI.

Asterisk cannot run where the gateway's tests run, so this module plays its part of the AGI
conversation, as recorded from a real Asterisk in ``shared/fixtures/agi`` (the transcripts are
the truth; ``tests/test_asterisk_simulator.py`` replays every one of them against this code):

- :class:`SimulatedChannel` is one channel running ``AGI()``, sans-I/O (h11 style): bytes the
  AGI program wrote go in with the time they arrived (:meth:`~SimulatedChannel.receive_data`,
  :meth:`~SimulatedChannel.receive_eof`, :meth:`~SimulatedChannel.advance`), what Asterisk does
  comes out as :class:`Write`, :class:`Sighup` and :class:`Close` actions, and
  :meth:`~SimulatedChannel.next_wakeup` says when to call again. The caller on the other end
  follows a script in the fixtures' ``SIM_SCRIPT`` language (``w1.5 d2``, ``w2 h``).
- :class:`SimulatedAsteriskProtocol` and :func:`place_call` drive channels over TCP with
  Twisted, like Asterisk's FastAGI client, on any ``IReactorTime`` (``task.Clock`` in tests)
  and with a time scale for load tests (``time_scale=0.01``: prompts and the caller 100x faster).
- :func:`run_classic_agi` runs a classic AGI script as a subprocess over stdin/stdout, with the
  ``AST_*`` environment variables and ``SIGHUP`` on hang-up, like Asterisk's ``AGI(script)``.

What the channel does, with the fixture that shows it:

- FastAGI sends ``agi_network: yes`` and ``agi_network_script`` first; classic AGI neither
  (m-classic-agi). Every environment line is raw UTF-8, the block ends with an empty line.
- Keys come back as ASCII codes (``200 result=50 endpos=13600``); ``endpos`` counts samples
  at 8000 per second, milliseconds for CONTROL STREAM FILE (j-control-stream). STREAM FILE
  and GET OPTION's prompt hear only their escape digits (d2); GET DATA returns the digits as
  text, ``#`` ends it, `` (timeout)`` marks a timeout (g, o); a key pressed while no
  key-reading command runs is thrown away (q).
- A missing prompt answers ``result=-1 endpos=0`` at once (GET DATA: ``result=-1``) and turns
  AGISTATUS into FAILURE (h-missing-file).
- When the caller hangs up, the running command answers ``-1``, and with AGISIGHUP (the
  default) a ``HANGUP`` line follows about 40 ms later, before the answer of a command sent
  meanwhile (n-key-then-hangup); classic AGI gets ``SIGHUP`` instead (m2). Then channel
  commands get ``511``, VERBOSE and the variable commands still ``200`` (e, f). The program's
  own HANGUP also brings the ``HANGUP`` line (a). AGIEXITONHANGUP: ``HANGUP``, ``HANGUP``,
  close (e3). Otherwise Asterisk never closes a FastAGI socket by itself: when the program
  half-closes, it writes ``HANGUP`` (with AGISIGHUP) and closes (b, e, e2).
- A line written while STREAM FILE, GET OPTION's prompt or GET DATA runs stops it with no
  answer; during WAIT FOR DIGIT it answers ``result=1`` first (p-pipelined-command).
- ``510`` for an unknown command, an empty line, or a line ending in ``\\r`` (the ``\\r``
  sticks to the last word); the ``520`` block for a wrong syntax (i-env-and-vars).

Where the transcripts are silent, the behaviour follows Asterisk's ``res/res_agi.c`` (for
example: a hang-up during GET OPTION's wait after the prompt answers ``result=0``, because
Asterisk keeps only escape digits there; RECORD FILE rewinds 200 ms on its escape digit), and
the docstrings say so. The caller's timing was measured from the fixtures: ``d`` keys are
reported 0.2 s after the step starts and 0.35 s apart (250 ms gap plus a 100 ms tone), and a
``d`` step lasts 0.35 s per key plus 0.1 s (n-key-then-hangup, g-get-data).
"""

from __future__ import annotations

import contextlib
import enum
import functools
import heapq
import itertools
import math
import os
import re
import selectors
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol, IReactorTCP, IReactorTime
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = [
    "AST_ENVIRONMENT",
    "AST_VERSION",
    "DEFAULT_PROMPT_SECONDS",
    "NOTE_CLOSED",
    "NOTE_PROGRAM_EOF",
    "NOTE_RESET",
    "NOTE_SIGHUP",
    "SAMPLE_RATE",
    "STOCK_PROMPT_SECONDS",
    "Action",
    "CallResult",
    "CallerScript",
    "Close",
    "Fault",
    "FaultKind",
    "Recording",
    "Sighup",
    "SimulatedAsteriskProtocol",
    "SimulatedChannel",
    "TranscriptLine",
    "Write",
    "classic_environment",
    "fastagi_environment",
    "format_transcript",
    "parse_agi_arguments",
    "parse_caller_script",
    "place_call",
    "run_classic_agi",
]

# --------------------------------------------------------------------------------------------
# Figures measured on the recordings (fixtures/agi), in seconds unless said otherwise

#: Samples per second of ``endpos`` for STREAM FILE, GET OPTION and RECORD FILE.
SAMPLE_RATE: Final = 8000
#: How long a prompt plays when its duration is not configured.
DEFAULT_PROMPT_SECONDS: Final = 1.7
#: Asterisk's stock sounds as recorded: ``beep`` is ``endpos=3404`` (b-key-during-wait).
STOCK_PROMPT_SECONDS: Final[Mapping[str, float]] = {"beep": 3404 / SAMPLE_RATE}
#: ``core show version`` of the recording Asterisk, also ``agi_version`` and ``AST_VERSION``.
AST_VERSION: Final = "GIT-master-f0c1c1a7b7"

#: The unasked ``HANGUP`` line comes this long after the channel went (a, c, e, f: 40-44 ms).
HANGUP_NOTICE_DELAY: Final = 0.042
#: With AGIEXITONHANGUP the two ``HANGUP`` lines and the close come at once (e3: 2 ms).
EXIT_ON_HANGUP_DELAY: Final = 0.002
#: After the program half-closes: ``HANGUP`` and close (b: 3 ms, e: 2 ms, e2: 1 ms).
EOF_END_DELAY: Final = 0.002
#: A command that interrupted WAIT FOR DIGIT is answered this long after ``result=1`` (p: 44 ms).
INTERRUPTED_WAIT_ANSWER_DELAY: Final = 0.044
#: A ``d`` key is reported this long after its step starts ...
DTMF_REPORT_DELAY: Final = 0.2
#: ... the next ones this far apart (SendDTMF: 250 ms between keys plus a 100 ms tone) ...
DTMF_INTERVAL: Final = 0.35
#: ... and the step ends this long after its last key's slot (n: the ``h`` came at 1.95 s).
DTMF_STEP_TAIL: Final = 0.1
#: RECORD FILE rewinds 200 ms when an escape digit ends it (res_agi.c ``ast_stream_rewind``).
RECORD_DTMF_REWIND_SAMPLES: Final = 200 * SAMPLE_RATE // 1000
#: GET OPTION without a timeout argument waits the PBX's digit timeout (5 s by default).
DEFAULT_DIGIT_TIMEOUT_MS: Final = 5000
#: Asterisk reads a command into a 2048-byte buffer: a longer line is cut into several.
AGI_BUF_LEN: Final = 2048
#: parse_args in res_agi.c keeps at most 127 words.
MAX_ARGS: Final = 128

_KEYS: Final = "0123456789*#ABCD"
_TIME_EPSILON: Final = 1e-9
_CALL_NUMBERS = itertools.count(1)


# --------------------------------------------------------------------------------------------
# The caller's script


@dataclass(frozen=True, slots=True)
class CallerScript:
    """What the caller does, in seconds since the AGI session started.

    Parsed from the fixtures' ``SIM_SCRIPT`` language by :func:`parse_caller_script`.
    ``audio`` lists the intervals in which the caller plays a file (what RECORD FILE records).
    """

    text: str
    keys: tuple[tuple[float, str], ...] = ()
    audio: tuple[tuple[float, float], ...] = ()
    hangup_at: float | None = None

    def shifted(self, lead: float) -> CallerScript:
        """The same script for a caller who started ``lead`` seconds before the session."""
        if not lead:
            return self

        def at(t: float) -> float:
            return max(0.0, t - lead)

        return CallerScript(
            self.text,
            tuple((at(t), key) for t, key in self.keys),
            tuple((at(a), at(b)) for a, b in self.audio),
            None if self.hangup_at is None else at(self.hangup_at),
        )


def parse_caller_script(text: str, prompt_seconds: Callable[[str], float] | None = None) -> CallerScript:
    """Parse a caller script: whitespace-separated steps, as in the fixtures' headers.

    - ``w<s>``: wait until the sum of all ``w`` so far (seconds since the session started);
    - ``d<keys>``: SendDTMF; key *i* is reported at step start + 0.2 s + 0.35 s x *i*, the step
      lasts 0.35 s per key plus 0.1 s (measured on the fixtures: g-get-data, n-key-then-hangup);
    - ``p<file>``: play a file (takes its duration: what RECORD FILE hears);
    - ``h``: hang up (the steps after it are ignored).

    >>> parse_caller_script("w1.5 d4 w0.1 h").hangup_at
    1.95
    """
    seconds = prompt_seconds or (lambda _name: DEFAULT_PROMPT_SECONDS)
    keys: list[tuple[float, str]] = []
    audio: list[tuple[float, float]] = []
    hangup_at: float | None = None
    t = 0.0
    waited = 0.0
    for step in text.split():
        kind, arg = step[0], step[1:]
        if kind == "w":
            try:
                value = float(arg)
            except ValueError:
                value = -1.0
            if not value >= 0 or math.isinf(value):
                raise ValueError(f"caller script {text!r}: {step!r} needs seconds, like w1.5")
            waited += value
            t = max(t, waited)
        elif kind == "d":
            digits = arg.upper()
            if not digits or any(key not in _KEYS for key in digits):
                raise ValueError(f"caller script {text!r}: {step!r} needs DTMF keys from {_KEYS}, like d2")
            keys.extend((round(t + DTMF_REPORT_DELAY + i * DTMF_INTERVAL, 6), key) for i, key in enumerate(digits))
            t = round(t + len(digits) * DTMF_INTERVAL + DTMF_STEP_TAIL, 6)
        elif kind == "p":
            if not arg:
                raise ValueError(f"caller script {text!r}: {step!r} needs a file, like pbeep")
            end = round(t + seconds(arg), 6)
            audio.append((t, end))
            t = end
        elif kind == "h" and not arg:
            hangup_at = t
            break
        else:
            raise ValueError(f"caller script {text!r}: unknown step {step!r}; use w<seconds>, d<keys>, p<file> or h")
    return CallerScript(text, tuple(keys), tuple(audio), hangup_at)


@functools.lru_cache(maxsize=1024)
def _parse_caller_script_without_files(text: str) -> CallerScript:
    """:func:`parse_caller_script` of a script with no ``p`` step, which needs no prompt lengths:
    parsed once however many callers of a load test follow it (a :class:`CallerScript` is frozen)."""
    return parse_caller_script(text)


# --------------------------------------------------------------------------------------------
# The environment block


#: Environment variables Asterisk sets for a classic AGI script (m-classic-agi lists the names).
AST_ENVIRONMENT: Final[Mapping[str, str]] = {
    "AST_AGI_DIR": "/var/lib/asterisk/agi-bin",
    "AST_BUILD_DATE": "2026-11-22 17:34:52 UTC",
    "AST_BUILD_HOST": "vm",
    "AST_BUILD_KERNEL": "6.1.0",
    "AST_BUILD_MACHINE": "x86_64",
    "AST_BUILD_OS": "Linux",
    "AST_BUILD_USER": "root",
    "AST_CONFIG_DIR": "/etc/asterisk",
    "AST_CONFIG_FILE": "/etc/asterisk/asterisk.conf",
    "AST_DATA_DIR": "/var/lib/asterisk",
    "AST_KEY_DIR": "/var/lib/asterisk",
    "AST_LOG_DIR": "/var/log/asterisk",
    "AST_MODULE_DIR": "/usr/lib/asterisk/modules",
    "AST_MONITOR_DIR": "/var/spool/asterisk/monitor",
    "AST_RUN_DIR": "/var/run/asterisk",
    "AST_SPOOL_DIR": "/var/spool/asterisk",
    "AST_SYSTEMNAME": "",
    "AST_VAR_DIR": "/var/lib/asterisk",
    "AST_VERSION": AST_VERSION,
}


def _channel_fields(number: int, args: Sequence[str]) -> list[tuple[str, str]]:
    """The channel part of the environment, in Asterisk's order (setup_env in res_agi.c)."""
    fields = [
        ("agi_channel", f"Local/s@caller-sim-{number:08x};1"),
        ("agi_language", "en"),
        ("agi_type", "Local"),
        ("agi_uniqueid", f"1795370400.{number}"),
        ("agi_version", AST_VERSION),
        ("agi_callerid", "13800138000"),
        ("agi_calleridname", "unknown"),
        ("agi_callingpres", "0"),
        ("agi_callingani2", "0"),
        ("agi_callington", "0"),
        ("agi_callingtns", "0"),
        ("agi_dnid", "unknown"),
        ("agi_rdnis", "unknown"),
        ("agi_context", "hotline-rating"),
        ("agi_extension", "s"),
        ("agi_priority", "5"),
        ("agi_enhanced", "0.0"),
        ("agi_accountcode", ""),
        ("agi_threadid", str(139917442041536 + number)),
    ]
    fields.extend((f"agi_arg_{i}", arg) for i, arg in enumerate(args, start=1))
    return fields


def _with_overrides(fields: list[tuple[str, str]], overrides: Mapping[str, str] | None) -> list[tuple[str, str]]:
    if not overrides:
        return fields
    known = {name for name, _ in fields}
    merged = [(name, overrides.get(name, value)) for name, value in fields]
    merged.extend((name, value) for name, value in overrides.items() if name not in known)
    return merged


def fastagi_environment(
    host: str,
    port: int,
    path_and_query: str,
    *,
    args: Sequence[str] = (),
    overrides: Mapping[str, str] | None = None,
) -> list[tuple[str, str]]:
    """The environment Asterisk sends for ``AGI(agi://host:port/path?query,args...)``.

    ``agi_network_script`` is everything after ``host:port/``, query string included, and
    ``agi_request`` the whole URL (i-env-and-vars). ``overrides`` replaces fields by their full
    name (``{"agi_callerid": "13900139000"}``) or adds new ones at the end.
    """
    script = path_and_query.lstrip("/")
    number = next(_CALL_NUMBERS)
    fields = [
        ("agi_network", "yes"),
        ("agi_network_script", script),
        ("agi_request", f"agi://{host}:{port}/{script}"),
        *_channel_fields(number, args),
    ]
    return _with_overrides(fields, overrides)


def classic_environment(
    request: str, *, args: Sequence[str] = (), overrides: Mapping[str, str] | None = None
) -> list[tuple[str, str]]:
    """The environment of a classic AGI script: no ``agi_network`` lines (m-classic-agi)."""
    number = next(_CALL_NUMBERS)
    fields = [("agi_request", request), *_channel_fields(number, args)]
    return _with_overrides(fields, overrides)


# --------------------------------------------------------------------------------------------
# What comes out: actions, transcript, result


@dataclass(frozen=True, slots=True)
class Write:
    """Asterisk writes these bytes to the AGI program."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Sighup:
    """Asterisk sends SIGHUP to the classic AGI script (FastAGI gets a ``HANGUP`` line)."""


@dataclass(frozen=True, slots=True)
class Close:
    """Asterisk closes the connection (``reset``: abortively, an RST)."""

    reset: bool = False


Action = Write | Sighup | Close


class FaultKind(enum.Enum):
    """A way for the simulated Asterisk to misbehave, for the gateway's robustness tests."""

    GARBLE = "garble"  # a line that is not a response, instead of the reply
    TRUNCATE = "truncate"  # half of the reply's first line, no newline, then close
    STALL = "stall"  # no reply, and nothing ever again; the connection stays open
    RESET = "reset"  # the connection is reset (RST) instead of the reply
    OVERSIZE = "oversize"  # the reply's first line padded to more than ``size`` bytes


@dataclass(frozen=True, slots=True)
class Fault:
    """Misbehave instead of sending reply number ``at_reply``.

    Replies are counted from 1 (the answer to the first command; a ``520`` block is one reply);
    0 is the environment block. ``HANGUP`` lines are not replies.
    """

    kind: FaultKind
    at_reply: int = 1
    size: int = 1 << 20


#: Transcript notes (``!!``) for what is not a line on the wire.
NOTE_SIGHUP: Final = "SIGHUP"
NOTE_CLOSED: Final = "Asterisk closes the connection"
NOTE_RESET: Final = "Asterisk resets the connection"
NOTE_PROGRAM_EOF: Final = "the AGI program closed its side"

#: The line a GARBLE fault sends: no status code, not ``HANGUP``, bytes that are not UTF-8.
GARBLED_LINE: Final = b"2O0 resu1t=\xff\xfe?? endp\x00s=%\n"


@dataclass(frozen=True, slots=True)
class TranscriptLine:
    """One line of a transcript, like the fixtures: ``<<`` from Asterisk, ``>>`` from the
    program, ``!!`` a note (nothing on the wire). ``time`` is in seconds since the session
    started (simulated seconds when a time scale is used)."""

    time: float
    direction: str
    data: bytes

    @property
    def text(self) -> str:
        """The line as the fixtures show it: UTF-8, other non-printable bytes escaped."""
        text = self.data.decode("utf-8", "backslashreplace")
        return "".join(ch if ch.isprintable() or ch == " " else repr(ch)[1:-1] for ch in text)

    def __str__(self) -> str:
        return f"{round(self.time * 1000):6d} {self.direction} {self.text}"


def format_transcript(lines: Iterable[TranscriptLine]) -> str:
    """A transcript in the fixtures' format, one line per entry."""
    return "".join(f"{line}\n" for line in lines)


@dataclass(frozen=True, slots=True)
class Recording:
    """A file RECORD FILE wrote (in the simulation: its name and length only)."""

    filename: str
    format: str
    samples: int
    ended_by: str  # "dtmf", "timeout", "hangup"


@dataclass
class CallResult:
    """How a simulated call ended, as the dialplan after ``AGI()`` would see it.

    ``variables`` holds what the AGI program set with SET VARIABLE (last value wins), e.g.
    ``HCP_RATING``; ``channel_variables`` all the channel's variables at the end. ``ended_by``
    is ``program`` (it closed its side), ``asterisk`` (AGIEXITONHANGUP), ``fault`` (an injected
    fault closed it), ``reset`` (the connection broke), ``timeout`` (the test's own limit),
    ``connect-failed`` (nothing listening: AGISTATUS FAILURE, as in Asterisk) or ``running``.
    ``elapsed`` is in seconds of the driver's clock, ``sim_elapsed`` in simulated seconds.
    """

    agi_status: str
    hangup_cause: int
    variables: dict[str, str]
    channel_variables: dict[str, str]
    transcript: list[TranscriptLine]
    ended_by: str
    hung_up_by: str | None = None
    elapsed: float = 0.0
    sim_elapsed: float = 0.0
    recordings: list[Recording] = field(default_factory=list)
    fault: Fault | None = None
    exit_status: int | None = None
    stderr: bytes = b""
    timed_out: bool = False

    @property
    def transcript_text(self) -> str:
        return format_transcript(self.transcript)


# --------------------------------------------------------------------------------------------
# Reading a command line the way res_agi.c does


def parse_agi_arguments(line: bytes) -> list[bytes]:
    """Split a command line into words exactly like ``parse_args`` in res_agi.c.

    Spaces and tabs separate words; double quotes group (``""`` is an empty word); a backslash
    makes the next byte literal. ``\\r`` is an ordinary byte, so ``NOOP\\r`` is one word.

    >>> parse_agi_arguments(b'STREAM FILE beep ""')
    [b'STREAM', b'FILE', b'beep', b'']
    """
    if b"\\" in line:
        return _parse_agi_arguments_bytewise(line)
    # Without backslashes the quotes alone decide: between the 1st and 2nd quote, the 3rd and
    # 4th, ... is quoted. Same rules as the byte-by-byte reading, a part at a time (the load
    # generator reads every command with this).
    words: list[bytes] = []
    whitespace = True
    quoted = False
    for part in line.split(b'"'):
        if quoted:  # an opening quote starts a word (even an empty one) unless it is inside one
            if whitespace:
                words.append(part)
                whitespace = False
            else:
                words[-1] += part
        elif part:
            pieces = part.replace(b"\t", b" ").split(b" ")
            first = pieces[0]
            if first and not whitespace:
                words[-1] += first
            elif first and len(words) < MAX_ARGS - 1:
                words.append(first)
                whitespace = False
            for piece in pieces[1:]:  # each follows a separator
                whitespace = True
                if piece and len(words) < MAX_ARGS - 1:
                    words.append(piece)
                    whitespace = False
        quoted = not quoted
    return words


def _parse_agi_arguments_bytewise(line: bytes) -> list[bytes]:
    """:func:`parse_agi_arguments` byte by byte, as parse_args does: for lines with backslashes."""
    words: list[bytearray] = []
    current = bytearray()
    quoted = escaped = False
    whitespace = True
    for byte in line:
        if byte == 0x22 and not escaped:  # "
            quoted = not quoted
            if quoted and whitespace:
                current = bytearray()
                words.append(current)
                whitespace = False
            continue
        if byte in (0x20, 0x09) and not quoted and not escaped:
            whitespace = True
            continue
        if byte == 0x5C and not escaped:  # backslash
            escaped = True
            continue
        if whitespace:
            if len(words) >= MAX_ARGS - 1:
                continue
            current = bytearray()
            words.append(current)
            whitespace = False
        current.append(byte)
        escaped = False
    return [bytes(word) for word in words]


_INT_PREFIX = re.compile(rb"\s*([+-]?\d+)")


def _scan_int(word: bytes) -> int | None:
    """``sscanf(word, "%30d")``: the leading integer, or None when there is none."""
    match = _INT_PREFIX.match(word[:30])
    return int(match.group(1)) if match else None


def _atoi(word: bytes) -> int:
    value = _scan_int(word)
    return 0 if value is None else value


def _b(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _s(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


# The 520 usage texts: Asterisk sends the raw text of the command's XML <description>.
# WAIT FOR DIGIT's is verified on i-env-and-vars; the others are the same paragraphs of
# res_agi.c's documentation, whitespace collapsed (their layout when a description has several
# paragraphs is not verified).
_USAGE: Final[Mapping[str, str]] = {
    "wait for digit": (
        "Waits up to <replaceable>timeout</replaceable> milliseconds for channel to receive a "
        "DTMF digit. Returns <literal>-1</literal> on channel failure, <literal>0</literal> if "
        "no digit is received in the timeout, or the numerical value of the ascii of the digit "
        "if one is received. Use <literal>-1</literal> for the <replaceable>timeout</replaceable>"
        " value if you desire the call to block indefinitely."
    ),
    "stream file": (
        "Send the given file, allowing playback to be interrupted by the given digits, if any. "
        "Returns <literal>0</literal> if playback completes without a digit being pressed, or "
        "the ASCII numerical value of the digit if one was pressed, or <literal>-1</literal> on "
        "error or if the channel was disconnected. If musiconhold is playing before calling "
        "stream file it will be automatically stopped and will not be restarted after "
        "completion."
    ),
    "control stream file": (
        "Send the given file, allowing playback to be controlled by the given digits, if any. "
        "Use double quotes for the digits if you wish none to be permitted. Returns "
        "<literal>0</literal> if playback completes without a digit being pressed, or the ASCII"
        " numerical value of the digit if one was pressed, or <literal>-1</literal> on error or"
        " if the channel was disconnected."
    ),
    "get option": "Behaves similar to STREAM FILE but used with a timeout option.",
    "get data": (
        "Stream the given <replaceable>file</replaceable>, and receive DTMF data. "
        "Returns the digits received from the channel at the other end."
    ),
    "record file": (
        "Record to a file until a given dtmf digit in the sequence is received. Returns "
        "<literal>-1</literal> on hangup or error.  The format will specify what kind of file "
        "will be recorded. The <replaceable>timeout</replaceable> is the maximum record time in"
        " milliseconds, or <literal>-1</literal> for no <replaceable>timeout</replaceable>. "
        "<replaceable>offset samples</replaceable> is optional, and, if provided, will seek to "
        "the offset without exceeding the end of the file. <replaceable>silence</replaceable> "
        "is the number of seconds of silence allowed before the function returns despite the "
        "lack of dtmf digits or reaching <replaceable>timeout</replaceable>. "
        "<replaceable>silence</replaceable> value must be preceded by <literal>s=</literal> and"
        " is also optional."
    ),
    "get variable": (
        "Returns <literal>0</literal> if <replaceable>variablename</replaceable> is not set. "
        "Returns <literal>1</literal> if <replaceable>variablename</replaceable> is set and "
        "returns the variable in parentheses. Example return code: 200 result=1 (testvariable)"
    ),
    "get full variable": (
        "Returns <literal>0</literal> if <replaceable>variablename</replaceable> is not set or "
        "channel does not exist. Returns <literal>1</literal> if "
        "<replaceable>variablename</replaceable> is set and returns the variable in "
        "parenthesis. Understands complex variable names and builtin variables, unlike GET "
        "VARIABLE. Example return code: 200 result=1 (testvariable)"
    ),
    "set variable": "Sets a variable to the current channel.",
    "verbose": (
        "Sends <replaceable>message</replaceable> to the console via verbose message system. "
        "<replaceable>level</replaceable> is the verbose level (1-4). Always returns "
        "<literal>1</literal>"
    ),
    "channel status": (
        "Returns the status of the specified <replaceable>channelname</replaceable>. If no "
        "channel name is given then returns the status of the current channel. Return values:"
    ),
    "hangup": ("Hangs up the specified channel. If no channel name is given, hangs up the current channel"),
    "set context": "Sets the context for continuation upon exiting the application.",
    "set extension": "Changes the extension for continuation upon exiting the application.",
    "set priority": (
        "Changes the priority for continuation upon exiting the application. The priority must "
        "be a valid priority or label."
    ),
}

#: Commands a real Asterisk knows that this simulation does not play: answered 510, with a note.
_NOT_SIMULATED: Final = (
    "asyncagi break", "database del", "database deltree", "database get", "database put",
    "exec", "gosub", "receive char", "receive text", "say alpha", "say digits", "say number",
    "say phonetic", "say date", "say time", "say datetime", "send image", "send text",
    "set autohangup", "set callerid", "set music", "tdd mode", "speech create", "speech set",
    "speech destroy", "speech load grammar", "speech unload grammar",
    "speech activate grammar", "speech deactivate grammar", "speech recognize",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Command:
    words: tuple[bytes, ...]
    name: str
    method: str | None  # None: known to Asterisk, not simulated
    runs_dead: bool  # the "dead" column of res_agi.c's command table


def _command(name: str, method: str | None, runs_dead: bool) -> _Command:
    return _Command(tuple(_b(word) for word in name.split()), name, method, runs_dead)


_COMMANDS: Final[tuple[_Command, ...]] = (
    _command("answer", "_cmd_answer", False),
    _command("channel status", "_cmd_channel_status", False),
    _command("get data", "_cmd_get_data", False),
    _command("get full variable", "_cmd_get_full_variable", True),
    _command("get option", "_cmd_get_option", False),
    _command("get variable", "_cmd_get_variable", True),
    _command("hangup", "_cmd_hangup", False),
    _command("noop", "_cmd_noop", True),
    _command("record file", "_cmd_record_file", False),
    _command("set context", "_cmd_set_context", False),
    _command("set extension", "_cmd_set_extension", False),
    _command("set priority", "_cmd_set_priority", False),
    _command("set variable", "_cmd_set_variable", True),
    _command("stream file", "_cmd_stream_file", False),
    _command("control stream file", "_cmd_control_stream_file", False),
    _command("verbose", "_cmd_verbose", True),
    _command("wait for digit", "_cmd_wait_for_digit", False),
    *(_command(name, None, name.startswith(("asyncagi", "database", "exec", "gosub"))) for name in _NOT_SIMULATED),
)


#: Each command by its words, with its place in the table (the first match wins in res_agi.c).
_COMMAND_PLACES: Final[Mapping[tuple[bytes, ...], tuple[int, _Command]]] = {
    command.words: (place, command) for place, command in reversed(list(enumerate(_COMMANDS)))
}


def _find_command(argv: Sequence[bytes]) -> _Command | None:
    """``find_command(argv, 0)``: the command words, case-insensitive, extra words allowed.

    Looked up by the first one, two and three words instead of a walk through the table; when
    several match, the one earliest in the table wins, as in the walk.
    """
    if not argv:
        return None
    places = _COMMAND_PLACES
    words = (argv[0].lower(),)
    found = places.get(words)
    for word in argv[1:3]:
        words += (word.lower(),)
        longer = places.get(words)
        if longer is not None and (found is None or longer[0] < found[0]):
            found = longer
    return None if found is None else found[1]


class _ShowUsage(Exception):
    """A handler found the arguments wrong: Asterisk answers with the 520 block."""


# --------------------------------------------------------------------------------------------
# Commands that take time


class _Op:
    """A command that runs for a while (a prompt, a wait). Times are the channel's."""

    takes_keys = True
    deadline: float | None = None

    def __init__(self, channel: SimulatedChannel) -> None:
        self.ch = channel
        self.start = channel._t

    def on_key(self, key: str) -> None:
        """A key the caller pressed while this command runs."""

    def on_deadline(self) -> None:
        """The deadline was reached."""

    def on_hangup(self) -> None:
        raise NotImplementedError

    def on_input(self) -> None:
        """The program wrote something (or closed) while this runs: by default it waits."""


class _StreamFile(_Op):
    """STREAM FILE: only escape digits stop it; ``endpos`` in samples (a, b, d2, p)."""

    def __init__(self, ch: SimulatedChannel, file: str, escape: str, offset: int) -> None:
        super().__init__(ch)
        self.escape = escape
        self.length = ch._samples(file)
        self.offset = max(0, min(offset, self.length))
        self.deadline = self.start + (self.length - self.offset) / SAMPLE_RATE

    def position(self) -> int:
        played = round((self.ch._t - self.start) * SAMPLE_RATE)
        return min(self.length, self.offset + played)

    def on_key(self, key: str) -> None:
        if key in self.escape:
            self.ch._finish(f"200 result={ord(key)} endpos={self.position()}")

    def on_deadline(self) -> None:
        self.ch._finish(f"200 result=0 endpos={self.length}")

    def on_hangup(self) -> None:
        self.ch._finish(f"200 result=-1 endpos={self.position()}")

    def on_input(self) -> None:
        self.ch._note("the prompt is stopped by the next command and sends no answer")
        self.ch._finish(None)


class _GetOption(_StreamFile):
    """GET OPTION: the prompt (as STREAM FILE), then a wait for a key (r-get-option).

    In the wait, res_agi.c keeps a key only if it is an escape digit (``result=0`` otherwise)
    and, by the same check, answers ``result=0`` to a hang-up and to a new command too.
    """

    def __init__(self, ch: SimulatedChannel, file: str, escape: str, timeout_ms: int) -> None:
        super().__init__(ch, file, escape, 0)
        self.timeout_ms = timeout_ms
        self.waiting = False

    def _answer(self, key: str | None) -> None:
        code = ord(key) if key is not None and key in self.escape else 0
        self.ch._finish(f"200 result={code} endpos={self.length}")

    def on_key(self, key: str) -> None:
        if self.waiting:
            self._answer(key)
        else:
            super().on_key(key)

    def on_deadline(self) -> None:
        if self.waiting or self.timeout_ms == 0:
            self._answer(None)
            return
        self.waiting = True
        self.deadline = None if self.timeout_ms < 0 else self.ch._t + self.timeout_ms / 1000

    def on_hangup(self) -> None:
        if self.waiting:
            self._answer(None)
        else:
            super().on_hangup()

    def on_input(self) -> None:
        if self.waiting:
            self._answer(None)
            self.ch._delay_next_command(INTERRUPTED_WAIT_ANSWER_DELAY)
        else:
            super().on_input()


class _WaitForDigit(_Op):
    """WAIT FOR DIGIT: any key (b, d); a new command makes it answer ``result=1`` (p)."""

    def __init__(self, ch: SimulatedChannel, timeout_ms: int) -> None:
        super().__init__(ch)
        self.deadline = None if timeout_ms < 0 else self.start + timeout_ms / 1000

    def on_key(self, key: str) -> None:
        self.ch._finish(f"200 result={ord(key)}")

    def on_deadline(self) -> None:
        self.ch._finish("200 result=0")

    def on_hangup(self) -> None:
        self.ch._finish("200 result=-1")

    def on_input(self) -> None:
        self.ch._note("WAIT FOR DIGIT is stopped by the next command: result=1")
        self.ch._finish("200 result=1")
        self.ch._delay_next_command(INTERRUPTED_WAIT_ANSWER_DELAY)


class _GetData(_Op):
    """GET DATA: prompt (any key stops it and counts), then keys until ``#``, the maximum or
    the timeout (g-get-data, o-get-data-timeout). Timeouts as ast_app_getdata_full: the given
    one for the first key and between keys; without one 6 s, then 2 s."""

    def __init__(self, ch: SimulatedChannel, file: str, timeout_ms: int, max_digits: int) -> None:
        super().__init__(ch)
        if timeout_ms > 0:
            self.first: float | None = timeout_ms / 1000
            self.between: float | None = timeout_ms / 1000
        elif timeout_ms < 0:
            self.first = self.between = None
        else:
            self.first, self.between = 6.0, 2.0
        self.max_digits = max_digits
        self.digits = ""
        self.prompting = bool(file)
        if self.prompting:
            self.deadline = self.start + ch._seconds(file)
        else:
            self._wait(self.first)

    def _wait(self, seconds: float | None) -> None:
        self.deadline = None if seconds is None else self.ch._t + seconds

    def on_key(self, key: str) -> None:
        self.prompting = False
        if key == "#":
            self.ch._finish(f"200 result={self.digits}")
            return
        self.digits += key
        if len(self.digits) >= self.max_digits:
            self.ch._finish(f"200 result={self.digits}")
        else:
            self._wait(self.between)

    def on_deadline(self) -> None:
        if self.prompting:
            self.prompting = False
            self._wait(self.first)
        else:
            self.ch._finish(f"200 result={self.digits} (timeout)")

    def on_hangup(self) -> None:
        self.ch._finish("200 result=-1")

    def on_input(self) -> None:
        self.ch._note("GET DATA is stopped by the next command and sends no answer")
        self.ch._finish(None)


class _ControlStreamFile(_Op):
    """CONTROL STREAM FILE: ``endpos`` in milliseconds (j-control-stream); ``#``/``*`` (or the
    given keys) skip forward/back, the pause key pauses. Played to the end, ``endpos=-1``
    ("end of file", as CPLAYBACKOFFSET; not in the recordings). New commands wait."""

    def __init__(
        self,
        ch: SimulatedChannel,
        file: str,
        stop: str,
        skip_ms: int,
        forward: str,
        rewind: str,
        pause: str,
        offset_ms: int,
    ) -> None:
        super().__init__(ch)
        self.stop, self.skip_ms, self.forward, self.rewind, self.pause = (
            stop, skip_ms, forward, rewind, pause,
        )  # fmt: skip
        self.length_ms = round(ch._seconds(file) * 1000)
        self.position_ms = max(0, min(offset_ms, self.length_ms))
        self.since = self.start
        self.paused = False
        self._plan()

    def position(self) -> int:
        if self.paused:
            return self.position_ms
        played = round((self.ch._t - self.since) * 1000)
        return min(self.length_ms, self.position_ms + played)

    def _plan(self) -> None:
        self.deadline = None if self.paused else self.since + (self.length_ms - self.position_ms) / 1000

    def _move(self, position_ms: int) -> None:
        self.position_ms = max(0, min(self.length_ms, position_ms))
        self.since = self.ch._t
        self._plan()

    def _end(self, result: int, status: str, key: str = "") -> None:
        offset = -1 if status == "SUCCESS" else self.position()
        self.ch._set_variable("CPLAYBACKSTATUS", status, by_program=False)
        self.ch._set_variable("CPLAYBACKOFFSET", str(offset), by_program=False)
        if key:
            self.ch._set_variable("CPLAYBACKSTOPKEY", key, by_program=False)
        self.ch._finish(f"200 result={result} endpos={offset}")

    def on_key(self, key: str) -> None:
        if key in self.forward:
            self._move(self.position() + self.skip_ms)
        elif key in self.rewind:
            self._move(self.position() - self.skip_ms)
        elif self.pause and key in self.pause:
            position = self.position()
            self.paused = not self.paused
            self._move(position)
        elif self.stop and key in self.stop:
            self._end(ord(key), "USERSTOPPED", key)

    def on_deadline(self) -> None:
        self._end(0, "SUCCESS")

    def on_hangup(self) -> None:
        self._end(-1, "ERROR")


class _RecordFile(_Op):
    """RECORD FILE (l-record-file): optional beep, then record until an escape digit
    (``result=35 (dtmf)``, 200 ms rewound), the timeout (``result=0 (timeout)``) or a hang-up
    (``result=-1 (hangup)``). Only the caller's ``p`` steps make audio (as on the recorded
    Local channel, where silence sends no frames), so silence detection (``s=``) never
    triggers. New commands wait until it ends."""

    def __init__(
        self,
        ch: SimulatedChannel,
        filename: str,
        file_format: str,
        escape: str,
        timeout_ms: int,
        offset: int,
        beep: bool,
    ) -> None:
        super().__init__(ch)
        self.filename, self.file_format, self.escape = filename, file_format, escape
        self.timeout_ms, self.offset = timeout_ms, offset
        self.recording_since = self.start
        self.beeping = beep
        if beep:
            self.deadline = self.start + ch._seconds("beep")
        else:
            self._record()

    def _record(self) -> None:
        self.beeping = False
        self.recording_since = self.ch._t
        self.deadline = None if self.timeout_ms < 0 else self.ch._t + self.timeout_ms / 1000

    def samples(self) -> int:
        return self.offset + self.ch._caller_audio_samples(self.recording_since, self.ch._t)

    def _done(self, result: int, why: str, samples: int) -> None:
        self.ch.recordings.append(Recording(self.filename, self.file_format, samples, why))
        self.ch._finish(f"200 result={result} ({why}) endpos={samples}")

    def on_key(self, key: str) -> None:
        if key not in self.escape:
            return
        if self.beeping:
            self.ch._finish(f"200 result={ord(key)} (randomerror) endpos={self.offset}")
        else:
            self._done(ord(key), "dtmf", max(0, self.samples() - RECORD_DTMF_REWIND_SAMPLES))

    def on_deadline(self) -> None:
        if self.beeping:
            self._record()
        else:
            self._done(0, "timeout", self.samples())

    def on_hangup(self) -> None:
        if self.beeping:
            self.ch._finish(f"200 result=-1 (randomerror) endpos={self.offset}")
        else:
            self._done(-1, "hangup", self.samples())


# --------------------------------------------------------------------------------------------
# The channel


class SimulatedChannel:
    """One Asterisk channel running ``AGI()``, sans-I/O.

    ``environment`` is the ``agi_*`` block to send (pairs or a mapping, in order; see
    :func:`fastagi_environment`, :func:`classic_environment`); without an ``agi_network`` line
    the channel plays classic AGI (SIGHUP instead of ``HANGUP`` lines). ``caller_script`` is
    what the caller does (:func:`parse_caller_script`); ``caller_lead`` shifts it earlier (the
    caller's half started that long before the session, e.g. while a classic script starts).

    Options as the channel variables of the fixtures: ``sighup`` (AGISIGHUP, default yes),
    ``exit_on_hangup`` (AGIEXITONHANGUP). ``missing_files`` are prompt names that do not exist;
    ``prompt_seconds`` the length of others (``default_prompt_seconds`` otherwise; ``beep`` is
    0.4255 s as recorded). ``variables`` are channel variables set before ``AGI()`` (e.g.
    ``HCP_WORK_ORDER``). ``fault`` makes it misbehave once (:class:`Fault`).

    Times given to the methods are seconds on any clock that only goes forward; the transcript
    counts from :meth:`start`. Every method returns the actions due by then, in order.
    """

    def __init__(
        self,
        environment: Mapping[str, str] | Iterable[tuple[str, str]],
        caller_script: str | CallerScript = "",
        *,
        sighup: bool = True,
        exit_on_hangup: bool = False,
        missing_files: Iterable[str] = (),
        prompt_seconds: Mapping[str, float] | None = None,
        default_prompt_seconds: float = DEFAULT_PROMPT_SECONDS,
        variables: Mapping[str, str] | None = None,
        caller_lead: float = 0.0,
        fault: Fault | None = None,
        record_transcript: bool = True,
    ) -> None:
        pairs = environment.items() if isinstance(environment, Mapping) else environment
        self.environment: tuple[tuple[str, str], ...] = tuple([(str(name), str(value)) for name, value in pairs])
        env = dict(self.environment)
        self.classic = "agi_network" not in env
        self.sighup = sighup
        self.exit_on_hangup = exit_on_hangup
        self.fault = fault
        self._missing = frozenset(missing_files)
        self._prompt_seconds = {**STOCK_PROMPT_SECONDS, **(prompt_seconds or {})}
        self._default_seconds = default_prompt_seconds
        if isinstance(caller_script, CallerScript):
            script = caller_script
        elif "p" not in caller_script:
            script = _parse_caller_script_without_files(caller_script)
        else:
            script = parse_caller_script(caller_script, self._seconds)
        self.caller_script = script.shifted(caller_lead)
        events = [(t, key) for t, key in self.caller_script.keys]
        if self.caller_script.hangup_at is not None:
            events.append((self.caller_script.hangup_at, ""))
        events.sort(key=lambda event: event[0])
        self._events = events
        self._event_index = 0
        self._audio = self.caller_script.audio

        self._record = record_transcript
        self._log: list[tuple[float, str, bytes]] = []
        self._transcript: list[TranscriptLine] = []
        self._transcript_built = 0  # entries of _log already in _transcript
        self.recordings: list[Recording] = []
        self.variables_set: dict[str, str] = {}
        self._vars: dict[str, str] = dict(variables or {})
        if not sighup:
            self._vars.setdefault("AGISIGHUP", "no")
        if exit_on_hangup:
            self._vars.setdefault("AGIEXITONHANGUP", "yes")
        self._env = env

        self._actions: list[Action] = []
        self._agenda: list[tuple[float, int, Callable[[], None]]] = []
        self._sequence = itertools.count()
        self._op: _Op | None = None
        self._lines: deque[tuple[float, bytes | None]] = deque()
        self._partial = bytearray()
        self._t0 = 0.0
        self._t = 0.0
        self._loop_free_at = 0.0
        self._started = False
        self._closed = False
        self._stalled = False
        self._reading_stopped = False
        self._eof = False
        self._hungup_at: float | None = None
        self.hung_up_by: str | None = None
        self._dead = False
        self._status = "SUCCESS"
        self._hangup_cause = 16
        self._replies = 0
        self.ended_by = "running"

    # -- state -------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Asterisk has closed (or reset) the connection: nothing more will come."""
        return self._closed

    @property
    def stalled(self) -> bool:
        return self._stalled

    @property
    def agi_status(self) -> str:
        """AGISTATUS as it stands: SUCCESS, FAILURE or HANGUP."""
        return self._status

    @property
    def hangup_cause(self) -> int:
        """16 (normal clearing) unless the program hung up the channel itself (0)."""
        return self._hangup_cause

    @property
    def now(self) -> float:
        """Seconds since :meth:`start` up to which the channel has run."""
        return self._t

    @property
    def transcript(self) -> list[TranscriptLine]:
        """The transcript so far, in the fixtures' lines.

        Built from :attr:`transcript_entries` when looked at, not line by line as the call runs:
        a load generator plays thousands of calls and reads few transcripts.
        """
        lines = self._transcript
        log = self._log
        for index in range(self._transcript_built, len(log)):
            t, direction, data = log[index]
            if direction != "<<":
                lines.append(TranscriptLine(t, direction, data))
                continue
            written = data.split(b"\n")
            lines.extend([TranscriptLine(t, "<<", line) for line in written[:-1]])
            if written[-1]:
                lines.append(TranscriptLine(t, "<<", written[-1]))
                lines.append(TranscriptLine(t, "!!", b"(no newline)"))
        self._transcript_built = len(log)
        return lines

    @property
    def transcript_entries(self) -> Sequence[tuple[float, str, bytes]]:
        """What :attr:`transcript` is made of, cheaper to read: ``(time, direction, data)`` for each
        note (``!!``), each line the program wrote (``>>``) and each write of Asterisk (``<<``:
        whole lines, several for the environment block or a ``520`` block). For load tests."""
        return self._log

    def result(self, **extra: object) -> CallResult:
        """The call's outcome so far; ``extra`` sets the driver's fields (elapsed, ...)."""
        values: dict[str, object] = {
            "agi_status": self._status,
            "hangup_cause": self._hangup_cause,
            "variables": dict(self.variables_set),
            "channel_variables": dict(self._vars),
            "transcript": list(self.transcript),
            "ended_by": self.ended_by,
            "hung_up_by": self.hung_up_by,
            "sim_elapsed": self._t,
            "recordings": list(self.recordings),
            "fault": self.fault,
        }
        values.update(extra)
        return CallResult(**values)  # type: ignore[arg-type]

    # -- input -------------------------------------------------------------------------------

    def start(self, now: float = 0.0) -> list[Action]:
        """The program is connected (or started): send the environment block."""
        if self._started:
            raise RuntimeError("SimulatedChannel.start() was already called")
        self._started = True
        self._t0 = now
        self._send_reply(_b("".join([f"{name}: {value}\n" for name, value in self.environment]) + "\n"))
        return self._take_actions()

    def receive_data(self, data: bytes, now: float) -> list[Action]:
        """Bytes the AGI program wrote, at ``now``."""
        self._require_started()
        self._run_until(now)
        if data and not (self._closed or self._stalled or self._eof):
            self._split_lines(data)
            self._interrupt_running_command()
            self._wake_loop()
            self._run_until(now)
        return self._take_actions()

    def receive_eof(self, now: float) -> list[Action]:
        """The program closed its side (FastAGI: FIN; classic: its stdout)."""
        self._require_started()
        self._run_until(now)
        if not (self._closed or self._eof):
            self._eof = True
            if self._partial:  # fgets hands over a last line without its newline
                self._queue_line(bytes(self._partial))
                self._partial.clear()
            self._note(NOTE_PROGRAM_EOF)
            self._lines.append((self._t, None))
            self._interrupt_running_command()
            self._wake_loop()
            self._run_until(now)
        return self._take_actions()

    def advance(self, now: float) -> list[Action]:
        """Let time pass up to ``now``: prompts end, keys come, timeouts expire."""
        self._require_started()
        self._run_until(now)
        return self._take_actions()

    def next_wakeup(self) -> float | None:
        """When :meth:`advance` next has something to do (on the caller's clock), or None."""
        if not self._started or self._closed or self._stalled:
            return None
        event = self._next_event()
        return None if event is None else self._t0 + max(event[0], self._t)

    def give_up(self, now: float) -> None:
        """The driver stops the call (its own time limit); noted in the transcript."""
        self._run_until(now)
        self._note("the test driver gives up on this call")

    # -- the event loop ----------------------------------------------------------------------

    def _require_started(self) -> None:
        if not self._started:
            raise RuntimeError("call SimulatedChannel.start() first")

    def _take_actions(self) -> list[Action]:
        actions, self._actions = self._actions, []
        return actions

    def _next_event(self) -> tuple[float, Callable[[], None]] | None:
        """The earliest thing due; on a tie the agenda, then the caller, then the command."""
        best_time = math.inf
        best: Callable[[], None] | None = None
        if self._agenda:
            best_time, best = self._agenda[0][0], self._run_agenda
        index = self._event_index
        if index < len(self._events) and self._hungup_at is None and not self._reading_stopped:  # caller still there
            t = self._events[index][0]
            if t < best_time:
                best_time, best = t, self._on_caller_event
        op = self._op
        if op is not None:
            deadline = op.deadline
            if deadline is not None and deadline < best_time:
                best_time, best = deadline, op.on_deadline
        elif self._lines and not self._reading_stopped:
            t = self._lines[0][0]
            if t < self._loop_free_at:
                t = self._loop_free_at
            if t < best_time:
                best_time, best = t, self._read_command
        return None if best is None else (best_time, best)

    def _run_until(self, now: float) -> None:
        target = now - self._t0
        limit = target + _TIME_EPSILON
        while not (self._closed or self._stalled):
            event = self._next_event()
            if event is None or event[0] > limit:
                break
            if event[0] > self._t:
                self._t = event[0]
            event[1]()
        if target > self._t:
            self._t = target

    def _schedule(self, at: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._agenda, (at, next(self._sequence), action))

    def _run_agenda(self) -> None:
        _, _, action = heapq.heappop(self._agenda)
        action()

    def _delay_next_command(self, delay: float) -> None:
        self._loop_free_at = max(self._loop_free_at, self._t + delay)

    # -- the program's lines -----------------------------------------------------------------

    def _split_lines(self, data: bytes) -> None:
        """Lines as fgets reads them into a 2048-byte buffer; the rest waits for more bytes."""
        partial = self._partial
        if partial:
            partial += data
            data = bytes(partial)
            partial.clear()
        start, size, longest = 0, len(data), AGI_BUF_LEN - 1
        while True:
            end = data.find(b"\n", start, start + longest)
            if end >= 0:
                self._queue_line(data[start:end])
                start = end + 1
            elif size - start >= longest:
                self._queue_line(data[start : start + longest])
                start += longest
            else:
                break
        if start < size:
            partial += data[start:]

    def _queue_line(self, line: bytes) -> None:
        self._lines.append((self._t, line))
        if self._record:
            self._log.append((self._t, ">>", line))

    def _interrupt_running_command(self) -> None:
        if self._op is not None:
            self._op.on_input()

    def _has_unread_input(self) -> bool:
        return bool(self._lines or self._partial)

    def _read_command(self) -> None:
        _, line = self._lines.popleft()
        if line is None:
            self._reading_stopped = True
            self._schedule(self._t + EOF_END_DELAY, lambda: self._end_session(after_eof=True))
            return
        if line[:7].lower() == b"failure":  # res_agi.c: the child could not run
            self._note("the program reported a failure: AGI() ends with FAILURE")
            self._status = "FAILURE"
            self._reading_stopped = True
            self._end_session(after_eof=False)
            return
        argv = parse_agi_arguments(line)
        command = _find_command(argv)
        if command is None:
            self._reply("510 Invalid or unknown command")
        elif command.method is None:
            self._note(f"{command.name.upper()} is not simulated: answered as unknown")
            self._reply("510 Invalid or unknown command")
        elif self._dead and not command.runs_dead:
            self._reply("511 Command Not Permitted on a dead channel or intercept routine")
        else:
            try:
                getattr(self, command.method)(argv)
            except _ShowUsage:
                usage = _b(_USAGE[command.name])
                self._send_reply(
                    b"520-Invalid command syntax.  Proper usage follows:\n" + usage + b"\n520 End of proper usage.\n"
                )

    def _start(self, op: _Op) -> None:
        self._op = op
        if self._has_unread_input():
            op.on_input()

    def _finish(self, reply: str | None) -> None:
        self._op = None
        if reply is not None:
            self._reply(reply)

    def _command_failed(self) -> None:
        """res_agi.c: a command's failure makes AGISTATUS FAILURE unless the caller is gone."""
        if self._dead or self._hungup_at is None:
            self._status = "FAILURE"

    # -- the caller --------------------------------------------------------------------------

    def _on_caller_event(self) -> None:
        _, key = self._events[self._event_index]
        self._event_index += 1
        if not key:
            self._note("the caller hangs up")
            self._hangup("caller")
        elif self._op is not None and self._op.takes_keys:
            self._note(f"the caller presses {key}")
            self._op.on_key(key)
        else:
            self._note(f"the caller presses {key}: no command reads keys, Asterisk drops it")

    def _caller_audio_samples(self, start: float, end: float) -> int:
        heard = sum(max(0.0, min(b, end) - max(a, start)) for a, b in self._audio)
        return round(heard * SAMPLE_RATE)

    def _hangup(self, by: str) -> None:
        if self._hungup_at is not None or self._reading_stopped:
            return
        self._hungup_at = self._t
        self.hung_up_by = by
        self._hangup_cause = 0 if by == "program" else 16
        if self._op is not None:
            self._op.on_hangup()
        delay = EXIT_ON_HANGUP_DELAY if self.exit_on_hangup else HANGUP_NOTICE_DELAY
        self._schedule(self._t + delay, self._notice_hangup)
        self._delay_next_command(delay)

    def _wake_loop(self) -> None:
        """Input while the hang-up is not yet noticed: run_agi's loop wakes and notices it at
        once, the command is still answered when the notice was due (n-key-then-hangup:
        ``HANGUP`` at 1951 ms, right after SET VARIABLE, its answer at 1994 ms)."""
        if self._hungup_at is not None and not self._dead and self._op is None:
            self._notice_hangup()

    def _notice_hangup(self) -> None:
        """run_agi's loop sees the channel gone: dead mode, ``HANGUP``/SIGHUP."""
        if self._dead or self._reading_stopped:
            return
        self._dead = True
        if self._status == "SUCCESS":
            self._status = "HANGUP"
        if self.sighup:
            self._signal_hangup()
        if self.exit_on_hangup:
            self._reading_stopped = True
            self._end_session(after_eof=False)

    def _end_session(self, *, after_eof: bool) -> None:
        """AGI() returns: FastAGI gets a last ``HANGUP`` line (with AGISIGHUP), then the close.

        A classic script that closed its stdout is waited for, not signalled (run_agi sets
        ``pid = -1`` then); one that is still running gets SIGHUP.
        """
        self._reading_stopped = True
        if self.sighup and not (self.classic and after_eof):
            self._signal_hangup()
        self.ended_by = "program" if after_eof else "asterisk"
        self._close(reset=False)

    def _signal_hangup(self) -> None:
        if self.classic:
            self._actions.append(Sighup())
            self._note(NOTE_SIGHUP)
        else:
            self._write(b"HANGUP\n")

    # -- output ------------------------------------------------------------------------------

    def _note(self, text: str) -> None:
        if self._record:
            self._log.append((self._t, "!!", _b(text)))

    def _write(self, data: bytes) -> None:
        """Asterisk writes ``data``: one transcript entry, split into lines when :attr:`transcript` is read."""
        self._actions.append(Write(data))
        if self._record:
            self._log.append((self._t, "<<", data))

    def _reply(self, line: str) -> None:
        self._send_reply(_b(line) + b"\n")

    def _send_reply(self, block: bytes) -> None:
        index = self._replies
        self._replies += 1
        fault = self.fault
        if fault is None or fault.at_reply != index:
            self._write(block)
            return
        self._note(f"fault: {fault.kind.value} instead of reply {index}")
        first, newline, rest = block.partition(b"\n")
        if fault.kind is FaultKind.GARBLE:
            self._write(GARBLED_LINE)
        elif fault.kind is FaultKind.OVERSIZE:
            self._write(first + b" " + b"x" * fault.size + newline + rest)
        elif fault.kind is FaultKind.TRUNCATE:
            self._write(first[: max(1, len(first) // 2)])
            self.ended_by = "fault"
            self._close(reset=False)
        elif fault.kind is FaultKind.RESET:
            self.ended_by = "fault"
            self._close(reset=True)
        else:
            self._stalled = True

    def _close(self, *, reset: bool) -> None:
        if self._closed:
            return
        self._closed = True
        self._reading_stopped = True
        self._op = None
        self._actions.append(Close(reset=reset))
        self._note(NOTE_RESET if reset else NOTE_CLOSED)

    # -- prompts and variables ---------------------------------------------------------------

    def _seconds(self, file: str) -> float:
        return self._prompt_seconds.get(file, self._default_seconds)

    def _samples(self, file: str) -> int:
        return round(self._seconds(file) * SAMPLE_RATE)

    def _is_missing(self, file: str) -> bool:
        return file in self._missing

    def _set_variable(self, name: str, value: str, *, by_program: bool = True) -> None:
        self._vars[name] = value
        if by_program:
            self.variables_set[name] = value

    def _lookup(self, name: str) -> str | None:
        """GET VARIABLE: a function (``NAME(args)``), a builtin, or a channel variable."""
        if name.endswith(")"):
            return self._function(name)
        builtin = {
            "CHANNEL": self._env.get("agi_channel"),
            "CONTEXT": self._env.get("agi_context"),
            "EXTEN": self._env.get("agi_extension"),
            "PRIORITY": self._env.get("agi_priority"),
            "UNIQUEID": self._env.get("agi_uniqueid"),
        }.get(name)
        if builtin is not None:
            return builtin
        return self._vars.get(name)

    def _function(self, expression: str) -> str | None:
        match = re.fullmatch(r"([A-Za-z_]+)\((.*)\)", expression, re.DOTALL)
        if not match:
            return None
        function, argument = match.group(1).upper(), match.group(2).strip()

        def known(value: str | None) -> str:
            return "" if value in (None, "unknown") else str(value)

        if function == "CALLERID":
            number = known(self._env.get("agi_callerid"))
            name = known(self._env.get("agi_calleridname"))
            values = {"num": number, "name": name, "all": f'"{name}" <{number}>'}
            return values.get(argument.lower())
        if function == "CHANNEL":
            values = {
                "name": self._env.get("agi_channel"),
                "uniqueid": self._env.get("agi_uniqueid"),
                "linkedid": self._env.get("agi_uniqueid"),
                "language": self._env.get("agi_language"),
                "channeltype": self._env.get("agi_type"),
                "state": "Down" if self._dead else "Up",
            }
            return values.get(argument.lower())
        if function == "LEN":
            return str(len(argument))
        return None

    def _substitute(self, text: str) -> str:
        """``${...}`` substitution for GET FULL VARIABLE (nested, with ``:offset:length``)."""
        out: list[str] = []
        i = 0
        while i < len(text):
            if not text.startswith("${", i):
                out.append(text[i])
                i += 1
                continue
            depth, j = 1, i + 2
            while j < len(text) and depth:
                if text.startswith("${", j):
                    depth, j = depth + 1, j + 2
                    continue
                if text[j] == "}":
                    depth -= 1
                j += 1
            if depth:
                out.append(text[i:])
                break
            out.append(self._expand(self._substitute(text[i + 2 : j - 1])))
            i = j
        return "".join(out)

    def _expand(self, inner: str) -> str:
        head, suffix = inner, ""
        cut = inner.rfind(")") + 1 if ")" in inner else 0
        colon = inner.find(":", cut)
        if colon >= 0:
            head, suffix = inner[:colon], inner[colon + 1 :]
        value = self._lookup(head) or ""
        if suffix:
            parts = suffix.split(":")
            offset = int(parts[0]) if parts[0].lstrip("-").isdigit() else 0
            value = value[offset:]
            if len(parts) > 1 and parts[1].lstrip("-").isdigit():
                value = value[: int(parts[1])]
        return value

    # -- the commands (res_agi.c handlers) ---------------------------------------------------

    def _cmd_answer(self, argv: list[bytes]) -> None:
        self._reply("200 result=0")

    def _cmd_noop(self, argv: list[bytes]) -> None:
        self._reply("200 result=0")

    def _cmd_verbose(self, argv: list[bytes]) -> None:
        if len(argv) < 2:
            raise _ShowUsage
        self._reply("200 result=1")

    def _cmd_channel_status(self, argv: list[bytes]) -> None:
        if len(argv) == 2:
            self._reply("200 result=6")
        elif len(argv) == 3:
            own = argv[2] == _b(self._env.get("agi_channel", ""))
            self._reply("200 result=6" if own else "200 result=-1")
        else:
            raise _ShowUsage

    def _cmd_hangup(self, argv: list[bytes]) -> None:
        if len(argv) > 2:
            raise _ShowUsage
        if len(argv) == 2 and argv[1] != _b(self._env.get("agi_channel", "")):
            self._reply("200 result=-1")
            return
        self._reply("200 result=1")
        self._hangup("program")

    def _cmd_set_variable(self, argv: list[bytes]) -> None:
        if len(argv) != 4:
            raise _ShowUsage
        self._set_variable(_s(argv[2]), _s(argv[3]))
        self._reply("200 result=1")

    def _cmd_get_variable(self, argv: list[bytes]) -> None:
        if len(argv) != 3:
            raise _ShowUsage
        value = self._lookup(_s(argv[2]))
        self._reply("200 result=0" if value is None else f"200 result=1 ({value})")

    def _cmd_get_full_variable(self, argv: list[bytes]) -> None:
        if len(argv) not in (4, 5):
            raise _ShowUsage
        if len(argv) == 5 and argv[4] != _b(self._env.get("agi_channel", "")):
            self._reply("200 result=0")
            return
        self._reply(f"200 result=1 ({self._substitute(_s(argv[3]))})")

    def _cmd_set_context(self, argv: list[bytes]) -> None:
        self._set_location(argv, "agi_context")

    def _cmd_set_extension(self, argv: list[bytes]) -> None:
        self._set_location(argv, "agi_extension")

    def _cmd_set_priority(self, argv: list[bytes]) -> None:
        if len(argv) == 3 and (_scan_int(argv[2]) or 0) < 1:
            raise _ShowUsage  # a label: there is no dialplan to look it up in
        self._set_location(argv, "agi_priority")

    def _set_location(self, argv: list[bytes], field_name: str) -> None:
        if len(argv) != 3:
            raise _ShowUsage
        self._env[field_name] = _s(argv[2])
        self._reply("200 result=0")

    def _cmd_stream_file(self, argv: list[bytes]) -> None:
        if not 4 <= len(argv) <= 5:
            raise _ShowUsage
        offset = 0
        if len(argv) == 5:
            value = _scan_int(argv[4])
            if value is None:
                raise _ShowUsage
            offset = value
        file = _s(argv[2])
        if self._is_missing(file):
            self._reply(f"200 result=-1 endpos={offset}")
            self._command_failed()
            return
        self._start(_StreamFile(self, file, _s(argv[3]), offset))

    def _cmd_get_option(self, argv: list[bytes]) -> None:
        if not 4 <= len(argv) <= 5:
            raise _ShowUsage
        timeout_ms = _atoi(argv[4]) if len(argv) == 5 else DEFAULT_DIGIT_TIMEOUT_MS
        file = _s(argv[2])
        if self._is_missing(file):
            self._reply("200 result=-1 endpos=0")
            self._command_failed()
            return
        self._start(_GetOption(self, file, _s(argv[3]), timeout_ms))

    def _cmd_get_data(self, argv: list[bytes]) -> None:
        if len(argv) < 3:
            raise _ShowUsage
        timeout_ms = _atoi(argv[3]) if len(argv) >= 4 else 0
        max_digits = _atoi(argv[4]) if len(argv) >= 5 else 1024
        file = _s(argv[2])
        if (file and self._is_missing(file)) or max_digits == 0:
            self._reply("200 result=-1")
            return
        self._start(_GetData(self, file, timeout_ms, max_digits))

    def _cmd_wait_for_digit(self, argv: list[bytes]) -> None:
        if len(argv) != 4:
            raise _ShowUsage
        timeout_ms = _scan_int(argv[3])
        if timeout_ms is None:
            raise _ShowUsage
        if timeout_ms == 0:
            self._reply("200 result=0")
            return
        self._start(_WaitForDigit(self, timeout_ms))

    def _cmd_control_stream_file(self, argv: list[bytes]) -> None:
        if not 5 <= len(argv) <= 10:
            raise _ShowUsage
        skip_ms = 3000
        if len(argv) > 5:
            value = _scan_int(argv[5])
            if value is None:
                raise _ShowUsage
            skip_ms = value
        offset_ms = 0
        if len(argv) > 9:
            value = _scan_int(argv[9])
            if value is None:
                raise _ShowUsage
            offset_ms = value

        def key_set(index: int, default: str) -> str:
            return _s(argv[index]) if len(argv) > index and argv[index] else default

        file = _s(argv[3])
        if self._is_missing(file):
            self._set_variable("CPLAYBACKSTATUS", "ERROR", by_program=False)
            self._reply("200 result=-1 endpos=-1")
            self._command_failed()
            return
        op = _ControlStreamFile(
            self, file, _s(argv[4]), skip_ms, key_set(6, "#"), key_set(7, "*"),
            key_set(8, ""), offset_ms,
        )  # fmt: skip
        self._start(op)

    def _cmd_record_file(self, argv: list[bytes]) -> None:
        if len(argv) < 6:
            raise _ShowUsage
        timeout_ms = _scan_int(argv[5])
        if timeout_ms is None:
            raise _ShowUsage
        offset, beep = 0, False
        if len(argv) > 6:
            value = _scan_int(argv[6])
            if value is not None:
                offset = max(0, value)
            elif b"=" not in argv[6]:
                beep = True
        if len(argv) > 7 and b"=" not in argv[7]:
            beep = True
        op = _RecordFile(self, _s(argv[2]), _s(argv[3]), _s(argv[4]), timeout_ms, offset, beep)
        self._start(op)


# --------------------------------------------------------------------------------------------
# FastAGI over TCP with Twisted


@implementer(IHalfCloseableProtocol)
class SimulatedAsteriskProtocol(Protocol):
    """Asterisk's end of one FastAGI connection, driving a :class:`SimulatedChannel`.

    Time comes from ``clock`` (``reactor`` or ``task.Clock``): the channel runs on simulated
    seconds = clock seconds / ``time_scale``. ``timeout`` (clock seconds) is the test's own
    limit: Asterisk has none, so a gateway that never closes would hang a test forever;
    after it the connection is aborted and the result says ``timed_out``.
    ``finished`` fires with the :class:`CallResult` when the connection is gone.
    """

    def __init__(
        self,
        channel: SimulatedChannel,
        clock: IReactorTime,
        *,
        time_scale: float = 1.0,
        timeout: float | None = None,
    ) -> None:
        if not time_scale > 0:
            raise ValueError(f"time_scale must be positive, not {time_scale!r}")
        self.channel = channel
        self.finished: Deferred[CallResult] = Deferred()
        self._clock = clock
        self._scale = time_scale
        self._timeout = timeout
        self._t0 = 0.0
        self._timer: IDelayedCall | None = None
        self._timer_at: float | None = None
        self._limit: IDelayedCall | None = None
        self._timed_out = False
        self._done = False

    def _sim_now(self) -> float:
        return (self._clock.seconds() - self._t0) / self._scale

    def connectionMade(self) -> None:
        self._t0 = self._clock.seconds()
        if self._timeout is not None:
            self._limit = self._clock.callLater(self._timeout, self._give_up)
        self._apply(self.channel.start(0.0))

    def dataReceived(self, data: bytes) -> None:
        self._apply(self.channel.receive_data(data, self._sim_now()))

    def readConnectionLost(self) -> None:
        self._apply(self.channel.receive_eof(self._sim_now()))

    def writeConnectionLost(self) -> None:
        """The program shut down its reading side: Asterisk would not notice."""

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        for call in (self._timer, self._limit):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._limit = None
        if self._done:
            return
        self._done = True
        channel = self.channel
        if channel.closed:
            ended_by = channel.ended_by
        else:  # the program closed, or the connection broke, before Asterisk closed it
            ended_by = "program" if reason.check(ConnectionDone) else "reset"
            channel.receive_eof(self._sim_now())  # nothing can be written any more
        if self._timed_out:
            ended_by = "timeout"
        result = channel.result(
            elapsed=self._clock.seconds() - self._t0,
            ended_by=ended_by,
            timed_out=self._timed_out,
        )
        self.finished.callback(result)

    def _apply(self, actions: list[Action]) -> None:
        transport = self.transport
        writes: list[bytes] = []
        for action in actions:
            if isinstance(action, Write):
                writes.append(action.data)
            elif isinstance(action, Close) and transport is not None:
                if writes:
                    transport.writeSequence(writes)
                    writes = []
                if action.reset:
                    transport.abortConnection()  # type: ignore[attr-defined]
                else:
                    transport.loseConnection()
            # Sighup: FastAGI has no process to signal; the channel wrote HANGUP instead.
        if writes and transport is not None:
            transport.writeSequence(writes)
        self._reschedule()

    def _reschedule(self) -> None:
        wake = self.channel.next_wakeup()
        if wake is None:
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = self._timer_at = None
            return
        delay = max(0.0, self._t0 + wake * self._scale - self._clock.seconds())
        if self._timer is not None and self._timer.active():
            if wake != self._timer_at:
                self._timer.reset(delay)
        else:
            self._timer = self._clock.callLater(delay, self._wake)
        self._timer_at = wake

    def _wake(self) -> None:
        due = self._timer_at
        self._timer = self._timer_at = None
        now = self._sim_now()
        self._apply(self.channel.advance(now if due is None else max(now, due)))

    def _give_up(self) -> None:
        self._limit = None
        self._timed_out = True
        self.channel.give_up(self._sim_now())
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


class _AsteriskCallFactory(ClientFactory):
    """One outgoing FastAGI connection; ``finished`` fires with the call's result."""

    def __init__(
        self,
        channel: SimulatedChannel,
        clock: IReactorTime,
        time_scale: float,
        timeout: float | None,
    ) -> None:
        self.channel = channel
        self.clock = clock
        self.time_scale = time_scale
        self.timeout = timeout
        self.finished: Deferred[CallResult] = Deferred()

    def buildProtocol(self, addr: object) -> SimulatedAsteriskProtocol:
        protocol = SimulatedAsteriskProtocol(self.channel, self.clock, time_scale=self.time_scale, timeout=self.timeout)
        protocol.finished.chainDeferred(self.finished)
        return protocol

    def clientConnectionFailed(self, connector: object, reason: Failure) -> None:
        """Nothing listening: Asterisk's AGI() returns at once with FAILURE (README)."""
        self.channel._note(f"cannot connect: {reason.getErrorMessage()}")
        self.finished.callback(self.channel.result(agi_status="FAILURE", ended_by="connect-failed"))


def place_call(
    reactor: IReactorTCP,
    host: str,
    port: int,
    path_and_query: str,
    caller_script: str = "",
    *,
    clock: IReactorTime | None = None,
    time_scale: float = 1.0,
    timeout: float | None = None,
    connect_timeout: float = 2.0,
    agi_args: Sequence[str] = (),
    agi_env: Mapping[str, str] | None = None,
    **options: object,
) -> Deferred[CallResult]:
    """Call the FastAGI server at ``host:port`` like ``AGI(agi://host:port/path?query)``.

    The caller follows ``caller_script``; ``options`` go to :class:`SimulatedChannel`
    (``sighup``, ``exit_on_hangup``, ``missing_files``, ``prompt_seconds``, ``variables``,
    ``fault``, ...). ``agi_args`` become ``agi_arg_N``; ``agi_env`` overrides environment
    fields by name. Timers use ``clock`` (default: the reactor) scaled by ``time_scale``;
    ``timeout`` and ``connect_timeout`` are in the clock's seconds (Asterisk gives up
    connecting after 2 s). Fires with the :class:`CallResult` when the connection is closed.
    """
    environment = fastagi_environment(host, port, path_and_query, args=agi_args, overrides=agi_env)
    channel = SimulatedChannel(environment, caller_script, **options)  # type: ignore[arg-type]
    time_source: IReactorTime = clock if clock is not None else reactor  # type: ignore[assignment]
    factory = _AsteriskCallFactory(channel, time_source, time_scale, timeout)
    reactor.connectTCP(host, port, factory, timeout=connect_timeout)
    return factory.finished


# --------------------------------------------------------------------------------------------
# Classic AGI: a subprocess over stdin/stdout


def run_classic_agi(
    argv: Sequence[str],
    caller_script: str = "",
    env_extra: Mapping[str, str] | None = None,
    *,
    interpreter: Sequence[str] = (),
    timeout: float = 30.0,
    time_scale: float = 1.0,
    agi_env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    **options: object,
) -> CallResult:
    """Run a classic AGI script like ``AGI(script,arg1,arg2)`` and play the call.

    ``argv`` is what Asterisk executes: ``[script, *args]``; ``agi_request`` is ``argv[0]``
    as written and each further item an ``agi_arg_N``. ``interpreter`` is put in front without
    changing that (``[sys.executable]`` for a script that is not executable). The process gets
    the ``AST_*`` variables and ``env_extra`` on top of this process's environment. On hang-up
    it gets SIGHUP instead of a ``HANGUP`` line (m2-classic-hangup); its exit status is
    recorded, and a non-zero one turns AGISTATUS SUCCESS into FAILURE (res_agi.c). Blocks for
    at most ``timeout`` real seconds, then kills the script (``timed_out``).
    """
    if not argv:
        raise ValueError("run_classic_agi needs the script to run: argv is empty")
    if not time_scale > 0:
        raise ValueError(f"time_scale must be positive, not {time_scale!r}")
    environment = classic_environment(argv[0], args=list(argv[1:]), overrides=agi_env)
    channel = SimulatedChannel(environment, caller_script, **options)  # type: ignore[arg-type]
    process_env = {**os.environ, **AST_ENVIRONMENT, **(env_extra or {})}
    started = time.monotonic()
    process = subprocess.Popen(
        [*interpreter, *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=process_env,
        cwd=cwd,
    )
    assert process.stdin is not None and process.stdout is not None
    assert process.stderr is not None
    driver = _ClassicDriver(channel, process, started, time_scale)
    deadline = started + timeout
    finished = driver.run(deadline)
    exit_status = driver.finish(deadline)
    result = channel.result(
        elapsed=time.monotonic() - started,
        exit_status=exit_status,
        stderr=bytes(driver.stderr),
        timed_out=not finished,
        ended_by=channel.ended_by if finished else "timeout",
    )
    if result.agi_status == "SUCCESS" and exit_status:
        result.agi_status = "FAILURE"
    return result


class _ClassicDriver:
    """The event loop of :func:`run_classic_agi`: pipes, signals and the channel's timers."""

    def __init__(
        self,
        channel: SimulatedChannel,
        process: subprocess.Popen[bytes],
        started: float,
        time_scale: float,
    ) -> None:
        assert process.stdin is not None and process.stdout is not None
        assert process.stderr is not None
        self.channel = channel
        self.process = process
        self.started = started
        self.scale = time_scale
        self.stderr = bytearray()
        self.outgoing = bytearray()
        self.stdin = process.stdin
        self.selector = selectors.DefaultSelector()
        for stream in (process.stdin, process.stdout, process.stderr):
            os.set_blocking(stream.fileno(), False)
        self.selector.register(process.stdout, selectors.EVENT_READ, "stdout")
        self.selector.register(process.stderr, selectors.EVENT_READ, "stderr")
        self.writing = False

    def sim_now(self) -> float:
        return (time.monotonic() - self.started) / self.scale

    def run(self, deadline: float) -> bool:
        """Play the call until Asterisk's side is over (True) or the deadline passed."""
        self.apply(self.channel.start(0.0))
        while not self.channel.closed:
            now = time.monotonic()
            if now >= deadline:
                self.channel.give_up(self.sim_now())
                return False
            wait = deadline - now
            wake = self.channel.next_wakeup()
            if wake is not None:
                wait = min(wait, max(0.0, self.started + wake * self.scale - now))
            for key, _ in self.selector.select(wait):
                self.on_ready(key)
            self.apply(self.channel.advance(self.sim_now()))
        return True

    def on_ready(self, key: selectors.SelectorKey) -> None:
        if key.data == "stdin":
            self.flush()
            return
        try:
            data = os.read(key.fd, 65536)
        except BlockingIOError:
            return
        if key.data == "stderr":
            self.stderr += data
            if not data:
                self.selector.unregister(key.fileobj)
        elif data:
            self.apply(self.channel.receive_data(data, self.sim_now()))
        else:
            self.selector.unregister(key.fileobj)
            self.apply(self.channel.receive_eof(self.sim_now()))

    def apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Write):
                self.outgoing += action.data
                self.flush()
            elif isinstance(action, Sighup):
                if self.process.poll() is None:
                    self.process.send_signal(signal.SIGHUP)
            else:
                self.close_stdin()

    def flush(self) -> None:
        if self.stdin.closed:
            self.outgoing.clear()
            return
        try:
            while self.outgoing:
                written = os.write(self.stdin.fileno(), self.outgoing)
                del self.outgoing[:written]
        except BlockingIOError:
            pass
        except OSError:  # the script is gone or closed its stdin: Asterisk's write fails too
            self.outgoing.clear()
        if self.outgoing and not self.writing:
            self.selector.register(self.stdin, selectors.EVENT_WRITE, "stdin")
            self.writing = True
        elif not self.outgoing and self.writing:
            self.selector.unregister(self.stdin)
            self.writing = False

    def close_stdin(self) -> None:
        """Asterisk closes its end of the pipes: what was not written yet is lost."""
        self.outgoing.clear()
        if self.writing:
            self.selector.unregister(self.stdin)
            self.writing = False
        if not self.stdin.closed:
            with contextlib.suppress(OSError):
                self.stdin.close()

    def finish(self, deadline: float) -> int:
        """Wait for the script to exit, kill it at the deadline; return its exit status."""
        self.close_stdin()
        process = self.process
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        assert process.stderr is not None and process.stdout is not None
        try:
            while chunk := os.read(process.stderr.fileno(), 65536):
                self.stderr += chunk
        except OSError:
            pass
        process.stdout.close()
        process.stderr.close()
        self.selector.close()
        return process.returncode
