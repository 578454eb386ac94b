"""FastAGI load benchmark: the gateway (SQLite, every rating durable) against a pyst2 reference.

    .venv/bin/python bench/agi_load.py                    # concurrency 1, 50, 500
    .venv/bin/python bench/agi_load.py --concurrency 500 --calls 5000
    .venv/bin/python bench/agi_load.py --placement unpinned pinned --servers gateway pyst2 asyncio
    .venv/bin/python bench/agi_load.py --concurrency 500 --by-command --time-scale 0.05
    .venv/bin/python bench/agi_load.py --concurrency 500 --rounds 3 --placement unpinned pinned

Plays Asterisk's side with the simulated channel of ``gateway.testing.asterisk`` (faithful to
the recorded transcripts) for many concurrent calls with a mix of paths: key during the
prompt, key after it, invalid then valid, no key at all, hang-up during the prompt, key then
hang-up. Each server runs in its own process; the load generator in another.

Reported per server and concurrency: rated calls/s and all calls/s, the command round trip
(from Asterisk's answer to the program's next command, p50/p99) as the generator saw it and
at the wire ("wire": ending when the command reached the generator's socket, from the kernel's
receive timestamp, so without the time it waited for the generator's own loop; a real Asterisk
reads each channel in a thread of its own), and the CPU time per call of
the server process (all its threads) and of the load generator. ``--placement pinned`` puts
the server on CPU 0 and the generator on CPU 1 (``sched_setaffinity``), so that neither takes
the other's core; ``unpinned`` lets the kernel place both. ``--servers asyncio`` adds a bare
asyncio handler: the floor that the generator and the machine leave to any server.

Checked: every key the simulated Asterisk delivered to the rating menu (its GET OPTION, or the
invalid-key or timeout hint before it, which a key interrupts) is the rating stored (the
gateway: read back from its SQLite store; the peers: the dict they dump on SIGTERM), and
nothing else was stored.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import json
import os
import random
import re
import signal
import socket
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import wave
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from twisted.internet import defer, task

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gateway.testing import asterisk as sim  # noqa: E402

#: 1 simulated second = 10 ms: prompts keep their proportions, calls are short. With 500 callers
#: that is 100x the call rate of 500 real callers; ``--time-scale`` changes it.
TIME_SCALE = 0.01

# (weight, name, caller script in simulated seconds); the menu prompt lasts 14.5 s.
PATHS = [
    (55, "key during prompt", "w5 d{key}"),
    (10, "key after prompt", "w16 d{key}"),
    (10, "invalid then valid", "w4 d9 w12 d{key}"),
    (5, "no key", "w200"),
    (10, "hang-up during prompt", "w4 h"),
    (10, "key then hang-up", "w5 d{key} w0.1 h"),
]
MENU_KEY = re.compile(rb"^200 result=(\d+)")
RATING_QUESTIONS = (
    b"GET OPTION hcp/hcp-rating-menu",
    b"STREAM FILE hcp/hcp-rating-invalid",
    b"STREAM FILE hcp/hcp-rating-timeout",
)

#: Linux's SO_TIMESTAMPNS (asm-generic; the ``socket`` module does not name it): every read
#: comes with the time its last bytes reached the socket, as a ``struct timespec`` on the
#: CLOCK_REALTIME clock.
SO_TIMESTAMPNS = 35
TIMESPEC = struct.Struct("qq")


def socket_wait(ancillary: list[tuple[int, int, bytes]]) -> float:
    """Seconds a read's bytes waited in the socket: now (``time.time()``) less their arrival."""
    now = time.time()
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= TIMESPEC.size:
            seconds, nanoseconds = TIMESPEC.unpack_from(data)
            return max(0.0, now - (seconds + nanoseconds / 1e9))
    return 0.0


def prompt_seconds() -> dict[str, float]:
    seconds = {}
    for path in (REPO / "prompts" / "zh").glob("*.wav"):
        with wave.open(str(path)) as audio:
            seconds[f"hcp/{path.stem}"] = audio.getnframes() / audio.getframerate()
    return seconds


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], limit: float = 30) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port} after {limit} s")


#: CPUs of each process by placement: (server, load generator); None lets the kernel choose.
PLACEMENTS: dict[str, tuple[set[int] | None, set[int] | None]] = {
    "unpinned": (None, None),
    "pinned": ({0}, {1}),
}


def on_cpus(cpus: set[int] | None) -> object:
    """A ``preexec_fn`` that pins the child (and every thread it starts) to ``cpus``."""
    if cpus is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads, so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Server:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    workdir: Path

    def stored(self) -> dict[str, str]:
        """call id → key of every counted rating, read after the server stopped."""
        if self.name == "gateway":
            connection = sqlite3.connect(self.workdir / "data" / "gateway.sqlite3")
            rows = connection.execute(
                "SELECT s.call_id, r.raw_input FROM ratings r JOIN service_records s ON s.id = r.service_record_id "
                "WHERE r.is_attempt = 0"
            ).fetchall()
            connection.close()
            return dict(rows)
        return json.loads((self.workdir / "results.json").read_text())

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=60)


def start_gateway(workdir: Path, cpus: set[int] | None) -> Server:
    port = free_port()
    env = {
        **os.environ,
        "GATEWAY_STORE_DATA_DIR": str(workdir / "data"),
        "GATEWAY_AGI_PORT": str(port),
        "GATEWAY_HTTP_ENABLED": "false",
        "GATEWAY_LOG_LEVEL": "warning",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=(workdir / "gateway.log").open("wb"),
        preexec_fn=on_cpus(cpus),
    )
    wait_for_port(port, process)
    return Server("gateway", port, process, workdir)


def start_peer(script: str, name: str) -> Callable[[Path, set[int] | None], Server]:
    """A reference peer of ``bench/peers``: ``script PORT RESULTS.json``, ratings dumped on SIGTERM."""

    def start(workdir: Path, cpus: set[int] | None) -> Server:
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, str(REPO / "bench" / "peers" / script), str(port), str(workdir / "results.json")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=(workdir / "peer.log").open("wb"),
            preexec_fn=on_cpus(cpus),
        )
        wait_for_port(port, process)
        return Server(name, port, process, workdir)

    return start


#: The servers a run can compare: option name → (label, how to start it).
SERVERS: dict[str, tuple[str, Callable[[Path, set[int] | None], Server]]] = {
    "gateway": ("gateway", start_gateway),
    "pyst2": ("pyst2 reference", start_peer("pyst2_fastagi.py", "pyst2 reference")),
    "asyncio": ("asyncio floor", start_peer("asyncio_fastagi.py", "asyncio floor")),
}


@dataclass
class LoadResult:
    calls: int
    seconds: float
    # repr=False: asyncio.run formats the finished main task, result included, when it ends
    delivered: dict[str, str] = field(repr=False)  # call id → key that reached a GET OPTION of the rating menu
    round_trips_ms: list[float] = field(repr=False)
    failures: int
    by_command: dict[str, list[float]] = field(default_factory=dict, repr=False)  # command verb → round trips
    driver_cpu: float = 0.0  # CPU seconds of the load generator
    server_cpu: float = 0.0  # CPU seconds of the server process during the load
    # The same round trips ending when each command reached the generator's socket (kernel
    # receive timestamp), not when the generator's loop got to it: empty with --generator twisted.
    wire_round_trips_ms: list[float] = field(default_factory=list, repr=False)
    wire_by_command: dict[str, list[float]] = field(default_factory=dict, repr=False)

    @property
    def rated(self) -> int:
        return len(self.delivered)


def command_verb(line: bytes) -> str:
    """``GET OPTION``, ``STREAM FILE``, ``SET VARIABLE``, ``CHANNEL STATUS``: the command's first two words."""
    return b" ".join(line.split()[:2]).decode("ascii", "replace")


def analyse(
    call_id: str,
    transcript: Iterable[tuple[float, str, bytes]],
    failed: bool,
    out: LoadResult,
    time_scale: float,
    lags: Mapping[float, float] | None = None,
) -> None:
    """The key the simulated Asterisk delivered to the rating menu, and each command's round trip.

    ``transcript`` is ``(time, direction, data)`` per line, or per entry
    (:attr:`~gateway.testing.asterisk.SimulatedChannel.transcript_entries`): the same figures,
    since an answer's lines come at one time and the first of them is the answer.

    ``lags`` maps the time a read was handed to the channel to how long its bytes had waited
    in the socket for the generator's loop (simulated seconds, from the kernel's receive
    timestamp): the wire round trip of a command is its round trip less that wait. A read
    without a timestamp counts as no wait.
    """
    last_answer: float | None = None
    asked_menu = False
    for time_, direction, data in transcript:
        if direction == "<<":
            if asked_menu and call_id not in out.delivered:
                match = MENU_KEY.match(data)
                if match and chr(int(match[1])) in "12345":
                    out.delivered[call_id] = chr(int(match[1]))
            asked_menu = False
            last_answer = time_
        elif direction == ">>":
            # The menu, or a hint before it, which a key interrupts to answer the menu.
            asked_menu = data.startswith(RATING_QUESTIONS) and not data.endswith(b' ""\n')
            if last_answer is not None:
                round_trip = (time_ - last_answer) * time_scale * 1000
                verb = command_verb(data)
                out.round_trips_ms.append(round_trip)
                out.by_command.setdefault(verb, []).append(round_trip)
                if lags is not None:
                    wire = round_trip - lags.get(time_, 0.0) * time_scale * 1000
                    out.wire_round_trips_ms.append(wire)
                    out.wire_by_command.setdefault(verb, []).append(wire)
                last_answer = None
    if failed:
        out.failures += 1


def analyse_result(call_id: str, result: sim.CallResult, out: LoadResult, time_scale: float) -> None:
    """:func:`analyse` of a finished call's :class:`~gateway.testing.asterisk.CallResult`."""
    lines = ((line.time, line.direction, line.data) for line in result.transcript)
    analyse(call_id, lines, result.agi_status == "FAILURE" or result.timed_out, out, time_scale)


def run_load(
    reactor: object, port: int, calls: int, concurrency: int, tag: str, seed: int, time_scale: float
) -> defer.Deferred[LoadResult]:
    rng = random.Random(seed)
    weights = [w for w, _, _ in PATHS]
    seconds = prompt_seconds()
    out = LoadResult(calls, 0.0, {}, [], 0)

    def one(index: int) -> defer.Deferred[None]:
        _, _, script = rng.choices(PATHS, weights)[0]
        call_id = f"{tag}.{index}"
        deferred = sim.place_call(
            reactor,
            "127.0.0.1",
            port,
            f"rating?call_id={call_id}&agent=A{index % 300}&work_order=WO-{index}",
            script.format(key=rng.choice("12345")),
            time_scale=time_scale,
            timeout=120,
            connect_timeout=30,
            prompt_seconds=seconds,
            agi_env={"agi_uniqueid": call_id},
        )
        return deferred.addCallback(lambda result: analyse_result(call_id, result, out, time_scale))

    def calls_iter() -> Iterator[defer.Deferred[None]]:
        for index in range(calls):
            yield one(index)

    started = time.perf_counter()
    cpu_started = time.process_time()
    work = calls_iter()
    cooperator = task.Cooperator()
    runners = [cooperator.coiterate(work) for _ in range(concurrency)]

    def done(_: object) -> LoadResult:
        out.seconds = time.perf_counter() - started
        out.driver_cpu = time.process_time() - cpu_started
        return out

    return defer.gatherResults(runners).addCallback(done)


class AsteriskOnAsyncio:
    """:class:`gateway.testing.asterisk.SimulatedAsteriskProtocol` on asyncio, for ``--generator asyncio``.

    The same :class:`~gateway.testing.asterisk.SimulatedChannel` (the part that is faithful to
    the transcripts) driven the same way, event for event: start on connect, bytes and the
    program's half-close in, timers from ``next_wakeup``, the test's own time limit. Only the
    carrier differs, to spare the generator's CPU (it shares the machine with the server, so
    every server's figures pay for it): a non-blocking socket watched by asyncio's loop, written
    and closed as asyncio's socket transport does (``TCP_NODELAY``; what the kernel does not
    take waits for the socket to be writable; ``close`` after the last byte, ``abort`` at once;
    the end on the next turn), without a transport, ``create_connection`` or a task per call.
    ``ended`` is called with this object once the connection is gone: :meth:`result` is the
    :class:`~gateway.testing.asterisk.CallResult`, :attr:`failed` what the benchmark counts.
    """

    #: What one ``recv`` takes at most, as asyncio's transport.
    MAX_READ = 256 * 1024
    _buffer = bytearray(MAX_READ)  # one for all calls: each read is copied out at once
    _view = memoryview(_buffer)
    _buffers = (_buffer,)
    _ancillary = socket.CMSG_SPACE(TIMESPEC.size)

    def __init__(
        self,
        channel: sim.SimulatedChannel,
        time_scale: float,
        timeout: float,
        ended: Callable[[AsteriskOnAsyncio], None],
    ) -> None:
        self.channel = channel
        self.ended_by = "running"
        self.timed_out = False
        self.connect_failed = False
        self.elapsed = 0.0
        self._loop = asyncio.get_running_loop()
        self._scale = time_scale
        self._timeout = timeout
        self._ended = ended
        self._sock: socket.socket | None = None
        self._fd = -1
        self._pending = bytearray()  # written, not yet taken by the kernel
        self._connected = False
        self._closing = False
        self._lost = False
        self._reading = False
        self._t0 = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._limit: asyncio.TimerHandle | None = None
        self._limit_at = 0.0  # the call's own limit, once connected
        #: Per read handed to the channel (by its simulated time): how long its bytes waited in
        #: the socket for this loop, from the kernel's receive timestamp (see :func:`analyse`).
        self.lags: dict[float, float] = {}

    @property
    def failed(self) -> bool:
        """AGISTATUS FAILURE (connect failures included) or the time limit reached."""
        return self.connect_failed or self.timed_out or self.channel.agi_status == "FAILURE"

    def result(self) -> sim.CallResult:
        """The call's result, as :class:`~gateway.testing.asterisk.SimulatedAsteriskProtocol` gives it."""
        if self.connect_failed:
            return self.channel.result(agi_status="FAILURE", ended_by="connect-failed")
        return self.channel.result(elapsed=self.elapsed, ended_by=self.ended_by, timed_out=self.timed_out)

    def connect(self, address: tuple[str, int], connect_timeout: float) -> None:
        """Start connecting; a refusal or ``connect_timeout`` ends the call with AGISTATUS FAILURE."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self._sock, self._fd = sock, sock.fileno()
        # One timer for both limits: connecting, then the call's (set when the first one fires).
        self._limit = self._loop.call_later(connect_timeout, self._limit_reached, True)
        error = sock.connect_ex(address)
        if error in (errno.EINPROGRESS, errno.EAGAIN, errno.EINTR):
            self._loop.add_writer(self._fd, self._connect_done, address)
        elif error:  # on the next turn, as a coroutine's failure: no recursion through the next call
            self._loop.call_soon(self._connect_failed, OSError(error, f"Connect call failed {address}"))
        else:
            self._connection_made()

    def _connect_done(self, address: tuple[str, int]) -> None:
        if self._sock is None:  # the connect timeout came first
            return
        self._loop.remove_writer(self._fd)
        error = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            self._connect_failed(OSError(error, f"Connect call failed {address}"))
        else:
            self._connection_made()

    def _connect_failed(self, error: OSError) -> None:
        """As ``create_connection`` under ``wait_for`` failing: the socket is closed, AGI() fails."""
        if self._limit is not None:
            self._limit.cancel()
            self._limit = None
        if self._sock is not None:
            self._loop.remove_writer(self._fd)
            self._sock.close()
            self._sock = None
        self.channel._note(f"cannot connect: {error}")
        self.connect_failed = True
        self.ended_by = "connect-failed"
        self._ended(self)

    def _limit_reached(self, connecting: bool) -> None:
        self._limit = None
        if not self._connected:
            self._connect_failed(TimeoutError())
        elif connecting:  # connected in time: now the call's own limit
            self._limit = self._loop.call_at(self._limit_at, self._limit_reached, False)
        else:
            self._give_up()

    def _sim_now(self) -> float:
        return (self._loop.time() - self._t0) / self._scale

    def _connection_made(self) -> None:
        self._connected = True
        self._t0 = self._loop.time()
        self._limit_at = self._t0 + self._timeout
        if self._limit is not None and self._limit.when() > self._limit_at:  # a call limit shorter than connecting
            self._limit.cancel()
            self._limit = self._loop.call_at(self._limit_at, self._limit_reached, False)
        self._apply(self.channel.start(0.0))
        if not self._closing:
            self._reading = True
            self._loop.add_reader(self._fd, self._read_ready)

    def _read_ready(self) -> None:
        if self._lost:
            return
        assert self._sock is not None
        try:
            size, ancillary, _, _ = self._sock.recvmsg_into(self._buffers, self._ancillary)
        except (BlockingIOError, InterruptedError):
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as error:
            self._fatal(error)
            return
        try:
            if size:
                now = self._sim_now()
                if ancillary:
                    self.lags[now] = socket_wait(ancillary) / self._scale
                self._apply(self.channel.receive_data(self._view[:size].tobytes(), now))
            else:  # the program half-closed: Asterisk closes when the channel says so
                self._stop_reading()
                self._apply(self.channel.receive_eof(self._sim_now()))
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as error:
            self._fatal(error)

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def _write(self, data: bytes) -> None:
        if self._lost or not data:
            return
        if self._pending:
            self._pending += data
            return
        assert self._sock is not None
        try:
            sent = self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as error:
            self._fatal(error)
            return
        if sent < len(data):
            self._pending += memoryview(data)[sent:]
            self._loop.add_writer(self._fd, self._write_ready)

    def _write_ready(self) -> None:
        if self._lost:
            return
        assert self._sock is not None
        try:
            sent = self._sock.send(self._pending)
        except (BlockingIOError, InterruptedError):
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as error:
            self._loop.remove_writer(self._fd)
            self._pending.clear()
            self._fatal(error)
            return
        del self._pending[:sent]
        if not self._pending:
            self._loop.remove_writer(self._fd)
            if self._closing:
                self._connection_lost(None)

    def _close(self) -> None:
        """``transport.close()``: no more reading; the connection goes once all is written."""
        if self._closing:
            return
        self._closing = True
        self._stop_reading()
        if not self._pending:
            self._lost = True
            self._loop.call_soon(self._connection_lost, None)

    def _abort(self, error: BaseException | None = None) -> None:
        """``transport.abort()``: what was not written is dropped, the connection goes at once."""
        if self._lost:
            return
        if self._pending:
            self._pending.clear()
            self._loop.remove_writer(self._fd)
        self._closing = True
        self._stop_reading()
        self._lost = True
        self._loop.call_soon(self._connection_lost, error)

    def _fatal(self, error: BaseException) -> None:
        if not isinstance(error, OSError):
            self._loop.call_exception_handler(
                {"message": "simulated Asterisk failed", "exception": error, "protocol": self}
            )
        self._abort(error)

    def _connection_lost(self, error: BaseException | None) -> None:
        self._lost = True
        for call in (self._timer, self._limit):
            if call is not None:
                call.cancel()
        self._timer = self._limit = None
        channel = self.channel
        if channel.closed:
            self.ended_by = channel.ended_by
        else:
            self.ended_by = "program" if error is None else "reset"
            channel.receive_eof(self._sim_now())
        if self.timed_out:
            self.ended_by = "timeout"
        self.elapsed = self._loop.time() - self._t0
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._ended(self)

    def _apply(self, actions: list[sim.Action]) -> None:
        writes: list[bytes] = []
        for action in actions:
            if isinstance(action, sim.Write):
                writes.append(action.data)
            elif isinstance(action, sim.Close) and not self._lost:
                if writes:
                    self._write(b"".join(writes))
                    writes = []
                if action.reset:
                    self._abort()
                else:
                    self._close()
        if writes and not self._closing:
            self._write(writes[0] if len(writes) == 1 else b"".join(writes))
        self._reschedule()

    def _reschedule(self) -> None:
        wake = self.channel.next_wakeup()
        if wake == self._timer_at and (wake is None or self._timer is not None):
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = wake
        if wake is not None:
            self._timer = self._loop.call_at(self._t0 + wake * self._scale, self._wake)

    def _wake(self) -> None:
        due = self._timer_at
        self._timer = self._timer_at = None
        now = self._sim_now()
        self._apply(self.channel.advance(now if due is None else max(now, due)))

    def _give_up(self) -> None:
        self.timed_out = True
        self.channel.give_up(self._sim_now())
        self._abort()


async def run_load_asyncio(
    port: int, calls: int, concurrency: int, tag: str, seed: int, time_scale: float
) -> LoadResult:
    """:func:`run_load` with :class:`AsteriskOnAsyncio`: the same calls, scripts and checks.

    ``concurrency`` calls at a time; each call that ends places the next one.
    """
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    weights = [w for w, _, _ in PATHS]
    seconds = prompt_seconds()
    out = LoadResult(calls, 0.0, {}, [], 0)
    indexes = iter(range(calls))
    finished: asyncio.Future[None] = loop.create_future()
    running = 0

    def place_next() -> None:
        nonlocal running
        index = next(indexes, None)
        if index is None:
            if not running and not finished.done():
                finished.set_result(None)
            return
        running += 1
        _, _, script = rng.choices(PATHS, weights)[0]
        call_id = f"{tag}.{index}"
        environment = sim.fastagi_environment(
            "127.0.0.1",
            port,
            f"rating?call_id={call_id}&agent=A{index % 300}&work_order=WO-{index}",
            overrides={"agi_uniqueid": call_id},
        )
        channel = sim.SimulatedChannel(environment, script.format(key=rng.choice("12345")), prompt_seconds=seconds)

        def ended(call: AsteriskOnAsyncio) -> None:
            nonlocal running
            running -= 1
            try:
                analyse(call_id, call.channel.transcript_entries, call.failed, out, time_scale, call.lags)
                place_next()
            except BaseException as error:  # the run fails, as when a task of a gather raised
                if not finished.done():
                    finished.set_exception(error)

        AsteriskOnAsyncio(channel, time_scale, timeout=120, ended=ended).connect(("127.0.0.1", port), 30)

    started = time.perf_counter()
    cpu_started = time.process_time()
    for _ in range(concurrency):
        place_next()
    await finished
    out.seconds = time.perf_counter() - started
    out.driver_cpu = time.process_time() - cpu_started
    return out


def measure(
    server_factory: object, calls: int, concurrency: int, seed: int, placement: str, time_scale: float, generator: str
) -> tuple[LoadResult, dict[str, str]]:
    """Start a server, load it in a child process's reactor, stop it, read back what it stored."""
    server_cpus, driver_cpus = PLACEMENTS[placement]
    with tempfile.TemporaryDirectory() as tmp:
        server = server_factory(Path(tmp), server_cpus)  # type: ignore[operator]
        try:
            cpu_before = cpu_seconds(server.process.pid)
            result = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--drive",
                    str(server.port),
                    "--calls",
                    str(calls),
                    "--concurrency",
                    str(concurrency),
                    "--seed",
                    str(seed),
                    "--time-scale",
                    str(time_scale),
                    "--generator",
                    generator,
                ],
                capture_output=True,
                text=True,
                check=True,
                timeout=1800,
                preexec_fn=on_cpus(driver_cpus),
            )
            server_cpu = cpu_seconds(server.process.pid) - cpu_before
        finally:
            server.stop()
        data = json.loads(result.stdout)
        load = LoadResult(
            data["calls"],
            data["seconds"],
            data["delivered"],
            data["round_trips_ms"],
            data["failures"],
            data["by_command"],
            data["driver_cpu"],
            server_cpu,
            data["wire_round_trips_ms"],
            data["wire_by_command"],
        )
        return load, server.stored()


def drive(port: int, calls: int, concurrency: int, seed: int, time_scale: float, generator: str) -> None:
    """The load generator's own process (one reactor, so that every level starts fresh).

    It shares the machine with the server, and its own delays count in every round trip it
    measures, so it is kept as light as it can be without changing what it plays: no log line
    per connection (Twisted's "Starting factory"), and no full garbage collection of what
    start-up built (a pause there is a late answer to every call at once).
    """
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)
    tag = f"{concurrency}.{seed}"
    results: list[LoadResult] = []
    if generator == "asyncio":
        results.append(asyncio.run(run_load_asyncio(port, calls, concurrency, tag, seed, time_scale)))
    else:
        drive_twisted(port, calls, concurrency, tag, seed, time_scale, results)
    load = results[0]

    print(
        json.dumps(
            {
                "calls": load.calls,
                "seconds": load.seconds,
                "delivered": load.delivered,
                "round_trips_ms": load.round_trips_ms,
                "failures": load.failures,
                "by_command": load.by_command,
                "driver_cpu": load.driver_cpu,
                "wire_round_trips_ms": load.wire_round_trips_ms,
                "wire_by_command": load.wire_by_command,
            }
        )
    )


def drive_twisted(
    port: int, calls: int, concurrency: int, tag: str, seed: int, time_scale: float, results: list[LoadResult]
) -> None:
    from twisted.internet import reactor

    sim._AsteriskCallFactory.noisy = False

    def go(_reactor: object) -> defer.Deferred[None]:
        return run_load(reactor, port, calls, concurrency, tag, seed, time_scale).addCallback(results.append)

    try:
        task.react(go)
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise


def quantiles_ms(values: list[float]) -> str:
    """p50 and p99 as two table cells; dashes where nothing was measured (no timestamps)."""
    if not values:
        return f"{'-':>8} {'-':>8}"
    return f"{percentile(values, 50):>6.1f}ms {percentile(values, 99):>6.1f}ms"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=1000, method="inclusive")[int(q * 10) - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 50, 500])
    parser.add_argument("--calls", type=int, default=0, help="calls per level (default: 200 × concurrency, ≤ 10000)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--placement",
        nargs="*",
        choices=sorted(PLACEMENTS),
        default=["unpinned"],
        help="unpinned: the kernel places server and generator; pinned: server on CPU 0, generator on CPU 1",
    )
    parser.add_argument(
        "--servers",
        nargs="*",
        choices=list(SERVERS),
        default=["gateway", "pyst2"],
        help="what to load, one after the other (asyncio: a bare asyncio handler, the floor of this machine)",
    )
    parser.add_argument(
        "--by-command",
        action="store_true",
        help="also the round trip by command: which answer the server is slow to follow (e.g. the rating's write)",
    )
    parser.add_argument(
        "--time-scale",
        type=float,
        default=TIME_SCALE,
        help="real seconds per simulated second (default 0.01: callers and prompts 100x faster than life)",
    )
    parser.add_argument(
        "--generator",
        choices=["twisted", "asyncio"],
        default="asyncio",
        help="what carries the simulated channels: asyncio on bare sockets (default: 0.30 ms of CPU per call, "
        "taken from the two cores the server runs on) or Twisted's client (0.45-0.85 ms)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="load the servers in turn this many times per level and placement (A B A B ...), then give "
        "each one's median and range and the median of the per-round ratios: this host's load drifts "
        "by the minute, and only runs side by side compare",
    )
    parser.add_argument("--drive", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive:
        drive(args.drive, args.calls, args.concurrency[0], args.seed, args.time_scale, args.generator)
        return
    print(
        f"FastAGI load, time scale {args.time_scale} "
        f"(prompts and caller timing {1 / args.time_scale:.0f}x faster than life)"
    )
    print(
        f"{'server':<16} {'placement':<9} {'conc':>5} {'calls':>6} {'rated':>6} {'calls/s':>8} {'rated/s':>8} "
        f"{'rtt p50':>8} {'rtt p99':>8} {'wire p50':>8} {'wire p99':>8} {'srv cpu':>8} {'gen cpu':>8}  check"
    )
    exit_status = 0
    for concurrency in args.concurrency:
        calls = args.calls or min(10_000, max(200, 200 * concurrency))
        for placement in args.placement:
            rounds: list[dict[str, LoadResult]] = []
            for _ in range(max(1, args.rounds)):
                status, loads = compare(
                    args.servers,
                    calls,
                    concurrency,
                    args.seed,
                    placement,
                    args.time_scale,
                    args.generator,
                    args.by_command,
                )
                exit_status |= status
                rounds.append(loads)
            if len(rounds) > 1:
                summarise(rounds, placement, concurrency)
    sys.exit(exit_status)


def summarise(rounds: list[dict[str, LoadResult]], placement: str, concurrency: int) -> None:
    """Median and range over the rounds, per server, and the median of each round's ratio to pyst2."""
    print(f"-- {len(rounds)} rounds, {placement}, concurrency {concurrency}: median (min-max)")
    for name in rounds[0]:
        rates = [loads[name].calls / loads[name].seconds for loads in rounds]
        p99s = [percentile(loads[name].round_trips_ms, 99) for loads in rounds]
        line = (
            f"   {name:<16} calls/s {statistics.median(rates):>6.0f} ({min(rates):.0f}-{max(rates):.0f})"
            f"  rtt p99 {statistics.median(p99s):>5.1f}ms ({min(p99s):.1f}-{max(p99s):.1f})"
        )
        reference = "pyst2 reference"
        if name != reference and reference in rounds[0]:
            ratios = [
                (loads[name].calls / loads[name].seconds) / (loads[reference].calls / loads[reference].seconds)
                for loads in rounds
            ]
            line += f"  ratio to pyst2 {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
        print(line, flush=True)


def compare(
    servers: list[str],
    calls: int,
    concurrency: int,
    seed: int,
    placement: str,
    time_scale: float,
    generator: str,
    by_command: bool,
) -> tuple[int, dict[str, LoadResult]]:
    """One level, each server in turn: 1 if the gateway lost or invented a rating, and the loads by server."""
    exit_status = 0
    loads: dict[str, LoadResult] = {}
    for name, factory in (SERVERS[server] for server in servers):
        load, stored = measure(factory, calls, concurrency, seed, placement, time_scale, generator)
        loads[name] = load
        wrong = {k for k in load.delivered if stored.get(k) != load.delivered[k]}
        extra = set(stored) - set(load.delivered)
        ok = not wrong and not extra
        exit_status |= 0 if ok or name != "gateway" else 1
        check = "ok: every delivered key stored" if ok else f"LOST/WRONG {len(wrong)}, EXTRA {len(extra)}"
        print(
            f"{name:<16} {placement:<9} {concurrency:>5} {load.calls:>6} {load.rated:>6} "
            f"{load.calls / load.seconds:>8.0f} {load.rated / load.seconds:>8.0f} "
            f"{percentile(load.round_trips_ms, 50):>6.1f}ms {percentile(load.round_trips_ms, 99):>6.1f}ms "
            f"{quantiles_ms(load.wire_round_trips_ms)} "
            f"{load.server_cpu / load.calls * 1000:>6.2f}ms {load.driver_cpu / load.calls * 1000:>6.2f}ms  {check}"
            + (f" (failures {load.failures})" if load.failures else ""),
            flush=True,
        )
        if by_command:
            for verb, round_trips in sorted(load.by_command.items()):
                print(
                    f"{'':<16} {'':<9} {'':>5} {len(round_trips):>6} {verb:<24}"
                    f"{percentile(round_trips, 50):>6.1f}ms {percentile(round_trips, 99):>6.1f}ms "
                    f"{quantiles_ms(load.wire_by_command.get(verb, []))}",
                    flush=True,
                )
    return exit_status, loads


if __name__ == "__main__":
    main()
