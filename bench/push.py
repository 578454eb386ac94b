"""Benchmark: the pusher, from a SQLite store to the strict test platform on loopback (SPEC R7.1).

    .venv/bin/python bench/push.py --records 20000 --rate 200 --seconds 10

Two measurements, each in a fresh SQLite store, the pusher on the reactor of
``gateway run`` (epoll), the platform in a process of its own (``python -m gateway.testing.platform``):

1. throughput: N ratings already pending; records/s until the platform has acknowledged all;
2. latency: ratings stored at a steady rate (group-committed through the store thread, as the
   FastAGI listener writes them) while the pusher runs; for each rating, the time from its
   commit to the platform's acknowledgement arriving back: p50, p99, max. Run once as in
   ``gateway run`` (a commit that writes the outbox wakes the pusher), and once with the pusher
   finding ratings by polling alone (as for ratings stored by another process).

Goals: ≥ 5,000 records/s; p99 < 500 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, task

from gateway.platform.pusher import HttpAnswer, PlatformClient, Pusher
from gateway.privacy import DataProtector
from gateway.rating import Level
from gateway.testing.platform import seed_call_ratings
from storage import migrate
from storage.deferred import DeferredStore, GroupWriter
from storage.store import Store, make_engine

APP_ID, SECRET = "gw-bench", "bench-secret"


def start_platform() -> tuple[subprocess.Popen[bytes], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway.testing.platform", "--port", "0", "--app-id", APP_ID, "--secret", SECRET],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    return process, process.stdout.readline().decode().split("url=")[1].split()[0]


def new_store(folder: Path, name: str) -> Store:
    engine = make_engine(f"sqlite:///{folder / name}")
    migrate.upgrade(engine)
    return Store(engine, DataProtector(os.urandom(32), os.urandom(32)))


class TimedClient(PlatformClient):
    """Notes when each record's acknowledgement arrives back (the end of the latency)."""

    acknowledged_at: dict[str, float]

    def post_batch(self, body: bytes) -> defer.Deferred[HttpAnswer]:
        def note(answer: HttpAnswer) -> HttpAnswer:
            now = time.perf_counter()
            if answer.status == 200:
                reply = json.loads(answer.body)
                for record_id in reply.get("accepted", []) + reply.get("duplicates", []):
                    self.acknowledged_at.setdefault(record_id, now)
            return answer

        return super().post_batch(body).addCallback(note)


def make_pusher(store: Store, url: str, *, watch_commits: bool) -> tuple[DeferredStore, TimedClient, Pusher]:
    threads = DeferredStore(store, reactor)
    client = TimedClient(reactor, url, APP_ID, SECRET, 10.0)
    client.acknowledged_at = {}
    commits = reactor if watch_commits else None
    return threads, client, Pusher(threads, client, reactor, app_id=APP_ID, commits_from=commits)


async def until(condition: Any, timeout: float) -> None:
    deadline = time.perf_counter() + timeout
    while not condition():
        if time.perf_counter() > deadline:
            raise SystemExit("timed out")
        await task.deferLater(reactor, 0.005)


async def throughput(folder: Path, url: str, records: int) -> float:
    store = new_store(folder, "throughput.sqlite3")
    seed_call_ratings(store, records)
    threads, _, pusher = make_pusher(store, url, watch_commits=False)
    threads.startService()
    started = time.perf_counter()
    pusher.startService()
    await until(lambda: pusher.stats.pushed >= records, 300)
    elapsed = time.perf_counter() - started
    await pusher.stopService()
    await threads.stopService()
    return records / elapsed


async def latency(folder: Path, url: str, rate: float, seconds: float, wake: bool) -> list[tuple[float, float]]:
    """(when stored, seconds after the start; latency in ms) for each rating."""
    store = new_store(folder, f"latency-{wake}.sqlite3")
    threads, client, pusher = make_pusher(store, url, watch_commits=wake)
    writer = GroupWriter(threads)
    threads.startService()
    pusher.startService()
    stored_at: dict[str, float] = {}
    writes: list[defer.Deferred[Any]] = []

    def stored(result: tuple[str, bool]) -> None:
        stored_at[result[0]] = time.perf_counter()

    total = int(rate * seconds)
    started = time.perf_counter()
    for n in range(total):
        # Keep to the schedule: each rating at its own moment, however long the last one took.
        delay = started + n / rate - time.perf_counter()
        if delay > 0:
            await task.deferLater(reactor, delay)
        hand_off = {"call_id": f"1796{n:06d}.1", "linked_id": f"1796{n:06d}.0", "agent_id": "A1", "caller": None}
        write = writer.write(
            "call_rating", hand_off=hand_off, level=Level(1 + n % 5), key="1", rated_at=datetime.now(UTC)
        )
        writes.append(write.addCallback(stored))
    await defer.gatherResults(writes)
    await until(lambda: all(r in client.acknowledged_at for r in stored_at), 60)
    await pusher.stopService()
    await threads.stopService()
    return [(stored_at[r] - started, (client.acknowledged_at[r] - stored_at[r]) * 1000) for r in stored_at]


def percentile(values: list[float], fraction: float) -> float:
    return values[min(len(values) - 1, int(fraction * len(values)))]


async def main(args: argparse.Namespace) -> None:
    platform, url = start_platform()
    try:
        with tempfile.TemporaryDirectory() as folder:
            rate = await throughput(Path(folder), url, args.records)
            print(f"throughput: {args.records} pending ratings pushed at {rate:,.0f} records/s (goal >= 5,000)")
            for wake in (False, True):
                measured = await latency(Path(folder), url, args.rate, args.seconds, wake)
                times = sorted(ms for _, ms in measured)
                steady = sorted(ms for at, ms in measured if at >= 1.0)
                how = "stored in this process: its commits wake the pusher" if wake else "found by polling alone"
                print(
                    f"latency at {args.rate:g} ratings/s for {args.seconds:g} s ({len(times)} ratings, {how}): "
                    f"p50 {statistics.median(times):.0f} ms, p99 {percentile(times, 0.99):.0f} ms, "
                    f"max {times[-1]:.0f} ms (goal p99 < 500 ms); after the first second (pusher no longer idle): "
                    f"p99 {percentile(steady, 0.99):.0f} ms, max {steady[-1]:.0f} ms"
                )
    finally:
        platform.terminate()
        platform.wait(timeout=10)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    task.react(lambda _reactor, args: defer.ensureDeferred(main(args)), [parser.parse_args()])
