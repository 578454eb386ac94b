"""FastAGI load benchmark: the gateway (SQLite, every rating durable) against a pyst2 reference.

    .venv/bin/python bench/agi_load.py                    # concurrency 1, 50, 500
    .venv/bin/python bench/agi_load.py --concurrency 500 --calls 5000
    .venv/bin/python bench/agi_load.py --placement unpinned pinned --servers gateway pyst2 asyncio
    .venv/bin/python bench/agi_load.py --concurrency 500 --by-command --time-scale 0.05

Plays Asterisk's side with the simulated channel of ``gateway.testing.asterisk`` (faithful to
the recorded transcripts) for many concurrent calls with a mix of paths: key during the
prompt, key after it, invalid then valid, no key at all, hang-up during the prompt, key then
hang-up. Each server runs in its own process; the load generator in another.

Reported per server and concurrency: rated calls/s and all calls/s, the command round trip
(from Asterisk's answer to the program's next command, p50/p99), and the CPU time per call of
the server process (all its threads) and of the load generator. ``--placement pinned`` puts
the server on CPU 0 and the generator on CPU 1 (``sched_setaffinity``), so that neither takes
the other's core; ``unpinned`` lets the kernel place both. ``--servers asyncio`` adds a bare
asyncio handler: the floor that the generator and the machine leave to any server.

Checked: every key the simulated Asterisk delivered to a GET OPTION is the rating stored (the
gateway: read back from its SQLite store; the peers: the dict they dump on SIGTERM), and
nothing else was stored.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import re
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import wave
from collections.abc import Callable, Iterator
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
    delivered: dict[str, str]  # call id → key that reached a GET OPTION of the rating menu
    round_trips_ms: list[float]
    failures: int
    by_command: dict[str, list[float]] = field(default_factory=dict)  # command verb → round trips
    driver_cpu: float = 0.0  # CPU seconds of the load generator
    server_cpu: float = 0.0  # CPU seconds of the server process during the load

    @property
    def rated(self) -> int:
        return len(self.delivered)


def command_verb(line: bytes) -> str:
    """``GET OPTION``, ``STREAM FILE``, ``SET VARIABLE``, ``CHANNEL STATUS``: the command's first two words."""
    return b" ".join(line.split()[:2]).decode("ascii", "replace")


def analyse(call_id: str, result: sim.CallResult, out: LoadResult, time_scale: float) -> None:
    """The key the simulated Asterisk delivered to the rating menu, and each command's round trip."""
    last_answer: float | None = None
    asked_menu = False
    for line in result.transcript:
        if line.direction == "<<":
            if asked_menu and call_id not in out.delivered:
                match = MENU_KEY.match(line.data)
                if match and chr(int(match[1])) in "12345":
                    out.delivered[call_id] = chr(int(match[1]))
            asked_menu = False
            last_answer = line.time
        elif line.direction == ">>":
            asked_menu = line.data.startswith(b"GET OPTION hcp/hcp-rating-menu")
            if last_answer is not None:
                round_trip = (line.time - last_answer) * time_scale * 1000
                out.round_trips_ms.append(round_trip)
                out.by_command.setdefault(command_verb(line.data), []).append(round_trip)
                last_answer = None
    if result.agi_status == "FAILURE" or result.timed_out:
        out.failures += 1


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
        return deferred.addCallback(lambda result: analyse(call_id, result, out, time_scale))

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


class AsteriskOnAsyncio(asyncio.Protocol):
    """:class:`gateway.testing.asterisk.SimulatedAsteriskProtocol` on asyncio, for ``--generator asyncio``.

    The same :class:`~gateway.testing.asterisk.SimulatedChannel` (the part that is faithful to
    the transcripts) driven the same way, event for event: start on connect, bytes and the
    program's half-close in, timers from ``next_wakeup``, the test's own time limit. Only the
    carrier differs: an asyncio connection costs the generator less CPU than Twisted's client.
    """

    def __init__(self, channel: sim.SimulatedChannel, time_scale: float, timeout: float) -> None:
        self.channel = channel
        self.finished: asyncio.Future[sim.CallResult] = asyncio.get_running_loop().create_future()
        self._loop = asyncio.get_running_loop()
        self._scale = time_scale
        self._timeout = timeout
        self._transport: asyncio.Transport | None = None
        self._t0 = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._limit: asyncio.TimerHandle | None = None
        self._timed_out = False

    def _sim_now(self) -> float:
        return (self._loop.time() - self._t0) / self._scale

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._t0 = self._loop.time()
        self._limit = self._loop.call_later(self._timeout, self._give_up)
        self._apply(self.channel.start(0.0))

    def data_received(self, data: bytes) -> None:
        self._apply(self.channel.receive_data(data, self._sim_now()))

    def eof_received(self) -> bool:
        self._apply(self.channel.receive_eof(self._sim_now()))
        return True  # half-closed: Asterisk closes when the channel says so

    def connection_lost(self, exc: Exception | None) -> None:
        for call in (self._timer, self._limit):
            if call is not None:
                call.cancel()
        self._timer = self._limit = None
        channel = self.channel
        if channel.closed:
            ended_by = channel.ended_by
        else:
            ended_by = "program" if exc is None else "reset"
            channel.receive_eof(self._sim_now())
        if self._timed_out:
            ended_by = "timeout"
        result = channel.result(elapsed=self._loop.time() - self._t0, ended_by=ended_by, timed_out=self._timed_out)
        if not self.finished.done():
            self.finished.set_result(result)

    def _apply(self, actions: list[sim.Action]) -> None:
        transport = self._transport
        writes: list[bytes] = []
        for action in actions:
            if isinstance(action, sim.Write):
                writes.append(action.data)
            elif isinstance(action, sim.Close) and transport is not None:
                if writes:
                    transport.write(b"".join(writes))
                    writes = []
                if action.reset:
                    transport.abort()
                else:
                    transport.close()
        if writes and transport is not None and not transport.is_closing():
            transport.write(b"".join(writes))
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
            delay = max(0.0, self._t0 + wake * self._scale - self._loop.time())
            self._timer = self._loop.call_later(delay, self._wake)

    def _wake(self) -> None:
        due = self._timer_at
        self._timer = self._timer_at = None
        now = self._sim_now()
        self._apply(self.channel.advance(now if due is None else max(now, due)))

    def _give_up(self) -> None:
        self._limit = None
        self._timed_out = True
        self.channel.give_up(self._sim_now())
        if self._transport is not None:
            self._transport.abort()


async def run_load_asyncio(
    port: int, calls: int, concurrency: int, tag: str, seed: int, time_scale: float
) -> LoadResult:
    """:func:`run_load` with :class:`AsteriskOnAsyncio`: the same calls, scripts and checks."""
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    weights = [w for w, _, _ in PATHS]
    seconds = prompt_seconds()
    out = LoadResult(calls, 0.0, {}, [], 0)
    indexes = iter(range(calls))

    async def one(index: int) -> None:
        _, _, script = rng.choices(PATHS, weights)[0]
        call_id = f"{tag}.{index}"
        environment = sim.fastagi_environment(
            "127.0.0.1",
            port,
            f"rating?call_id={call_id}&agent=A{index % 300}&work_order=WO-{index}",
            overrides={"agi_uniqueid": call_id},
        )
        channel = sim.SimulatedChannel(environment, script.format(key=rng.choice("12345")), prompt_seconds=seconds)
        protocol = AsteriskOnAsyncio(channel, time_scale, timeout=120)
        try:
            await asyncio.wait_for(loop.create_connection(lambda: protocol, "127.0.0.1", port), timeout=30)
        except (OSError, TimeoutError) as error:
            channel._note(f"cannot connect: {error}")
            result = channel.result(agi_status="FAILURE", ended_by="connect-failed")
        else:
            result = await protocol.finished
        analyse(call_id, result, out, time_scale)

    async def caller() -> None:
        for index in indexes:
            await one(index)

    started = time.perf_counter()
    cpu_started = time.process_time()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
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
        default="twisted",
        help="what carries the simulated channels: Twisted's client (default) or asyncio (less CPU per call)",
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
        f"{'rtt p50':>8} {'rtt p99':>8} {'srv cpu':>8} {'gen cpu':>8}  check"
    )
    exit_status = 0
    for concurrency in args.concurrency:
        calls = args.calls or min(10_000, max(200, 200 * concurrency))
        for placement in args.placement:
            exit_status |= compare(
                args.servers, calls, concurrency, args.seed, placement, args.time_scale, args.generator, args.by_command
            )
    sys.exit(exit_status)


def compare(
    servers: list[str],
    calls: int,
    concurrency: int,
    seed: int,
    placement: str,
    time_scale: float,
    generator: str,
    by_command: bool,
) -> int:
    """One level, each server in turn; 1 if the gateway lost or invented a rating."""
    exit_status = 0
    for name, factory in (SERVERS[server] for server in servers):
        load, stored = measure(factory, calls, concurrency, seed, placement, time_scale, generator)
        wrong = {k for k in load.delivered if stored.get(k) != load.delivered[k]}
        extra = set(stored) - set(load.delivered)
        ok = not wrong and not extra
        exit_status |= 0 if ok or name != "gateway" else 1
        check = "ok: every delivered key stored" if ok else f"LOST/WRONG {len(wrong)}, EXTRA {len(extra)}"
        print(
            f"{name:<16} {placement:<9} {concurrency:>5} {load.calls:>6} {load.rated:>6} "
            f"{load.calls / load.seconds:>8.0f} {load.rated / load.seconds:>8.0f} "
            f"{percentile(load.round_trips_ms, 50):>6.1f}ms {percentile(load.round_trips_ms, 99):>6.1f}ms "
            f"{load.server_cpu / load.calls * 1000:>6.2f}ms {load.driver_cpu / load.calls * 1000:>6.2f}ms  {check}"
            + (f" (failures {load.failures})" if load.failures else ""),
            flush=True,
        )
        if by_command:
            for verb, round_trips in sorted(load.by_command.items()):
                print(
                    f"{'':<16} {'':<9} {'':>5} {len(round_trips):>6} {verb:<24}"
                    f"{percentile(round_trips, 50):>6.1f}ms {percentile(round_trips, 99):>6.1f}ms",
                    flush=True,
                )
    return exit_status


if __name__ == "__main__":
    main()
