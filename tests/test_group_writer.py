"""Group commit on a real reactor and store thread: every write gets its own answer, in order."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Any

from twisted.internet import defer, task

from gateway.rating import Level
from gateway.testing.reactor import run_on_reactor
from storage.deferred import DeferredStore, GroupWriter
from storage.store import Store


def hand_off(call_id: str) -> dict[str, str | None]:
    return {"call_id": call_id, "linked_id": None, "agent_id": "A1", "work_order": "WO-1", "caller": None}


def rating(writer: GroupWriter, call_id: str, key: str = "5") -> defer.Deferred[Any]:
    return writer.write(
        "call_rating", hand_off=hand_off(call_id), level=Level(int(key)), key=key, rated_at=datetime.now(UTC)
    )


def test_writes_asked_for_while_a_batch_runs_go_together_and_each_gets_its_answer(sqlite_store: Store) -> None:
    batches: list[int] = []
    write_together = sqlite_store.write_together

    def counted(calls: Any) -> list[Any]:
        batches.append(len(calls))
        return write_together(calls)

    sqlite_store.write_together = counted  # type: ignore[method-assign]

    async def scenario(reactor: Any) -> list[Any]:
        store = DeferredStore(sqlite_store, reactor)
        store.startService()
        writer = GroupWriter(store, max_batch=50)
        answers = [rating(writer, f"c-{index}") for index in range(120)]
        answers.append(rating(writer, "c-0", "1"))  # a second rating of a call: kept as an attempt
        results = await defer.gatherResults(answers)
        await store.stopService()
        return results

    results = run_on_reactor(scenario)
    assert [counted for _, counted in results] == [True] * 120 + [False]
    assert len({record_id for record_id, _ in results}) == 121
    assert max(batches) <= 50 and sum(batches) == 121 and len(batches) < 20


def test_a_failed_batch_fails_its_writes_alone_and_the_writer_goes_on(sqlite_store: Store) -> None:
    write_together = sqlite_store.write_together
    failing = threading.Event()
    failing.set()

    def flaky(calls: Any) -> list[Any]:
        if failing.is_set():
            failing.clear()
            raise RuntimeError("database is locked")
        return write_together(calls)

    sqlite_store.write_together = flaky  # type: ignore[method-assign]

    async def scenario(reactor: Any) -> tuple[list[Any], Any]:
        store = DeferredStore(sqlite_store, reactor)
        store.startService()
        writer = GroupWriter(store)
        first = await defer.DeferredList([rating(writer, "c-1")], consumeErrors=True)
        second = await rating(writer, "c-2")
        await store.stopService()
        return first, second

    first, second = run_on_reactor(scenario)
    [(ok, failure)] = first
    assert not ok and failure.check(RuntimeError)
    assert second[1] is True


class HeldFirstBatch:
    """Counts batch sizes; the first batch waits for :meth:`release`, as a slow commit would."""

    def __init__(self, sqlite_store: Store) -> None:
        self.batches: list[int] = []
        self._entered = threading.Event()
        self._release = threading.Event()
        write_together = sqlite_store.write_together

        def counted(calls: Any) -> list[Any]:
            if not self.batches:
                self._entered.set()
                self._release.wait(10)
            self.batches.append(len(calls))
            return write_together(calls)

        sqlite_store.write_together = counted  # type: ignore[method-assign]

    async def committing(self, reactor: Any) -> None:
        """Until the store thread is in the first batch's transaction."""
        while not self._entered.is_set():
            await task.deferLater(reactor, 0.005, lambda: None)

    def release(self) -> None:
        self._release.set()


def test_under_load_the_writer_gathers_writes_until_enough_have_come(sqlite_store: Store) -> None:
    held = HeldFirstBatch(sqlite_store)

    async def scenario(reactor: Any) -> float:
        store = DeferredStore(sqlite_store, reactor)
        store.startService()
        writer = GroupWriter(store, gather_wait=5.0, gather_min=8, gather_rate=0.0)
        started = time.monotonic()
        first = rating(writer, "c-0")  # the writer was idle: this one is written at once
        await held.committing(reactor)
        during = [rating(writer, f"c-{index}") for index in range(1, 4)]  # came in during its commit
        held.release()
        await first
        later = [rating(writer, f"c-{index}") for index in range(4, 9)]  # the 8th ends the gathering
        await defer.gatherResults(during + later)
        everything = time.monotonic() - started
        await store.stopService()
        return everything

    everything = run_on_reactor(scenario)
    assert held.batches == [1, 8]  # not [1, 3, 5]: the second transaction waited for company
    assert everything < 2.0  # it did not wait out the 5 s gather_wait


def _three_written_during_a_commit(sqlite_store: Store, **options: Any) -> tuple[list[int], float]:
    """Batch sizes, and how long three writes asked for during the first commit took after it."""
    held = HeldFirstBatch(sqlite_store)

    async def scenario(reactor: Any) -> float:
        store = DeferredStore(sqlite_store, reactor)
        store.startService()
        writer = GroupWriter(store, **options)
        first = rating(writer, "c-0")
        await held.committing(reactor)
        during = [rating(writer, f"c-{index}") for index in range(1, 4)]
        held.release()
        await first
        committed = time.monotonic()
        await defer.gatherResults(during)
        waited = time.monotonic() - committed
        await store.stopService()
        return waited

    waited = run_on_reactor(scenario)
    return held.batches, waited


def test_gathering_gives_up_after_gather_wait(sqlite_store: Store) -> None:
    batches, waited = _three_written_during_a_commit(sqlite_store, gather_wait=0.2, gather_min=100, gather_rate=0.0)
    assert batches == [1, 3]
    assert 0.15 <= waited < 2.0  # it waited for more, then wrote the three it had


def test_without_gather_wait_the_writer_takes_what_is_waiting_at_once(sqlite_store: Store) -> None:
    batches, waited = _three_written_during_a_commit(sqlite_store)  # gather_wait 0: no gathering
    assert batches == [1, 3]
    assert waited < 0.15


def test_below_gather_rate_the_writer_does_not_gather(sqlite_store: Store) -> None:
    # Moderate load (50 concurrent calls): waiting would only lengthen the round trip.
    # Four writes in a fraction of a second are far below a million per second.
    batches, waited = _three_written_during_a_commit(sqlite_store, gather_wait=5.0, gather_min=8, gather_rate=1e6)
    assert batches == [1, 3]
    assert waited < 2.0  # not the 5 s gather_wait


def test_a_write_after_the_store_stopped_fails_at_once_instead_of_waiting_forever(sqlite_store: Store) -> None:
    """A stopped thread pool would keep the call queued for good; its caller must hear it failed."""

    async def scenario(reactor: Any) -> list[str]:
        store = DeferredStore(sqlite_store, reactor)
        store.startService()
        await store.stopService()
        writer = GroupWriter(store)
        outcomes = await defer.DeferredList([rating(writer, "c-1"), rating(writer, "c-2")], consumeErrors=True)
        again = await defer.DeferredList([rating(writer, "c-3")], consumeErrors=True)  # the writer is not stuck
        return [type(result.value).__name__ for _, result in [*outcomes, *again]]

    assert run_on_reactor(scenario) == ["StoreStopped"] * 3
