"""The pusher (SPEC R7.1, R7.2): to the platform within seconds, pushed only when acknowledged.

Three layers, fastest first:

- with ``task.Clock`` and a scripted platform: the decisions (backoff, Retry-After, 401,
  splitting, polling) with time in hand;
- on a real reactor of its own per test, against the strict test platform on loopback, with
  faults injected (errors, slow answers, dropped connections, the platform down);
- two ``gateway run`` processes on one PostgreSQL and the test platform as a third process.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, select, update
from twisted.internet import defer, error
from twisted.internet.task import Clock

from gateway.intake import ServiceRecordInput
from gateway.platform.policy import Backoff
from gateway.platform.pusher import HttpAnswer, PlatformClient, Pusher, platform_record
from gateway.rating import Channel, Level, ServiceKind
from gateway.testing.platform import Fault, PlatformServer, listen, seed_call_ratings
from gateway.testing.reactor import run_on_reactor, sleep
from storage import migrate
from storage.deferred import DeferredStore
from storage.outbox import Outbox
from storage.schema import bad_rating_cases, outbox, ratings, service_records
from storage.store import Store, make_engine
from tests.store_fixtures import make_protector

RATED = datetime.now(UTC) - timedelta(minutes=5)


def add_call_ratings(store: Store, count: int, *, start: int = 0) -> list[str]:
    """``count`` voice ratings of hotline calls, in one transaction, as the FastAGI path stores them."""
    ids = []
    with store.engine.begin() as connection:
        for n in range(start, start + count):
            call_id = f"1795{n:06d}.{n % 97}"
            pk = store.find_or_create_call_record(
                connection,
                call_id=call_id,
                linked_id=call_id + "0",
                fields={"agent_id": f"A{n % 40}", "work_order": f"GD{n:08d}", "completed_at": RATED},
            )
            _, record_id, _ = store.add_rating(
                connection,
                service_record_id=pk,
                level=Level(1 + n % 5),
                channel=Channel.VOICE,
                raw_input=str(5 - n % 5),
                rated_at=RATED,
            )
            ids.append(record_id)
    return ids


def add_matter_rating(store: Store, external_id: str, **fields: Any) -> str:
    store.upsert_service_records([ServiceRecordInput(id=external_id, kind=ServiceKind.MATTER, **fields)])
    with store.engine.begin() as connection:
        pk = connection.execute(
            select(service_records.c.id).where(service_records.c.external_id == external_id)
        ).scalar_one()
        return store.add_rating(
            connection, service_record_id=pk, level=Level.SATISFIED, channel=Channel.SMS, raw_input="2", rated_at=RATED
        )[1]


def outbox_rows(store: Store) -> dict[str, dict[str, Any]]:
    with store.engine.connect() as connection:
        return {row["record_id"]: dict(row) for row in connection.execute(select(outbox)).mappings()}


def statuses(store: Store) -> dict[str, str]:
    return {record_id: row["status"] for record_id, row in outbox_rows(store).items()}


# -- with time in hand ---------------------------------------------------------------------------


class SyncStore:
    """Runs store calls at once on the test's thread: with a Clock, time moves only when told."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def run(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        return defer.maybeDeferred(function, *args, **kwargs)


class ScriptedPlatform:
    """Stands in for the HTTP client: answers from a script, else acknowledges everything."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.sizes: list[int] = []
        self.script: deque[HttpAnswer | Exception | defer.Deferred[HttpAnswer]] = deque()
        self.refuse_batches_with: str | None = None
        self.refusal = b'{"code": 400, "error": "records[3] is not valid JSON"}'

    def post_batch(self, body: bytes) -> defer.Deferred[HttpAnswer]:
        ids = [record["recordId"] for record in json.loads(body)["records"]]
        self.batches.append(ids)
        self.sizes.append(len(body))
        if self.script:
            answer = self.script.popleft()
            if isinstance(answer, defer.Deferred):
                return answer
            return defer.fail(answer) if isinstance(answer, Exception) else defer.succeed(answer)
        if self.refuse_batches_with in ids:
            return defer.succeed(HttpAnswer(400, self.refusal))
        return defer.succeed(ack(accepted=ids))

    @property
    def sent(self) -> list[str]:
        return [record_id for batch in self.batches for record_id in batch]


def ack(**answer: Any) -> HttpAnswer:
    return HttpAnswer(200, json.dumps({"code": 0, **answer}).encode())


def make_pusher(store: Store, platform: ScriptedPlatform, clock: Clock, **options: Any) -> Pusher:
    options = {"workers": 1, "jitter": lambda: 1.0, "backoff": Backoff(initial=1, maximum=4), **options}
    return Pusher(SyncStore(store), platform, clock, app_id="gw-test", owner="gw-a", **options)


def test_records_are_marked_pushed_only_when_the_platform_acknowledges_them(sqlite_store: Store) -> None:
    """SPEC R7.2: a record the answer does not name stays pending and goes again."""
    ids = add_call_ratings(sqlite_store, 3)
    platform = ScriptedPlatform()
    platform.script.append(ack(accepted=ids[:1], duplicates=ids[1:2]))
    make_pusher(sqlite_store, platform, Clock()).startService()
    assert platform.batches == [ids, ids[2:]]
    rows = outbox_rows(sqlite_store)
    assert {r: row["status"] for r, row in rows.items()} == dict.fromkeys(ids, "pushed")
    assert rows[ids[2]]["attempts"] == 1 and rows[ids[0]]["attempts"] == 0


def test_rejected_records_are_set_aside_with_the_reason_and_never_sent_again(sqlite_store: Store) -> None:
    ids = add_call_ratings(sqlite_store, 3)
    platform = ScriptedPlatform()
    reason = "deptCode: must be an 18-character unified social credit code"
    platform.script.append(ack(accepted=[ids[0], ids[2]], rejected=[{"recordId": ids[1], "reason": reason}]))
    clock = Clock()
    make_pusher(sqlite_store, platform, clock).startService()
    clock.pump([1.0] * 10)
    assert platform.batches == [ids]
    rows = outbox_rows(sqlite_store)
    assert (rows[ids[1]]["status"], rows[ids[1]]["rejected_reason"]) == ("rejected", reason)
    assert rows[ids[0]]["status"] == rows[ids[2]]["status"] == "pushed"


def test_a_failing_platform_backs_off_the_pusher_as_a_whole_and_the_backlog_flows_when_it_answers(
    sqlite_store: Store,
) -> None:
    """SPEC R7.2: capped exponential backoff; no record waits on its own timer afterwards."""
    ids = add_call_ratings(sqlite_store, 50)
    platform = ScriptedPlatform()
    platform.script.extend([HttpAnswer(500, b""), error.ConnectionRefusedError(), defer.TimeoutError()] * 2)
    clock = Clock()
    make_pusher(sqlite_store, platform, clock, batch_size=10).startService()
    waits = []
    for expected_delay in (1, 2, 4, 4, 4, 4):  # doubled, then capped at 4 s
        sent = len(platform.batches)
        clock.advance(expected_delay - 0.01)
        assert len(platform.batches) == sent, "retried too soon"
        clock.advance(0.01)
        waits.append(expected_delay)
    assert len(platform.batches) == 7 + 4  # six failures, then the whole backlog at once
    assert set(statuses(sqlite_store).values()) == {"pushed"} and sorted(platform.sent[-50:]) == sorted(ids)
    assert outbox_rows(sqlite_store)[ids[0]]["attempts"] == 6


def test_retry_after_is_honoured(sqlite_store: Store) -> None:
    add_call_ratings(sqlite_store, 1)
    platform = ScriptedPlatform()
    platform.script.extend([HttpAnswer(429, b"", retry_after="7"), HttpAnswer(503, b"", retry_after="3")])
    clock = Clock()
    make_pusher(sqlite_store, platform, clock).startService()
    clock.advance(6.9)
    assert len(platform.batches) == 1
    clock.advance(0.1)
    assert len(platform.batches) == 2
    clock.advance(2.9)
    assert len(platform.batches) == 2
    clock.advance(0.1)
    assert len(platform.batches) == 3 and set(statuses(sqlite_store).values()) == {"pushed"}


def test_a_refused_signature_is_retried_and_said_loudly(sqlite_store: Store, caplog: pytest.LogCaptureFixture) -> None:
    add_call_ratings(sqlite_store, 1)
    platform = ScriptedPlatform()
    platform.script.append(HttpAnswer(401, b'{"code": 401, "error": "X-HCP-Signature does not match"}'))
    clock = Clock()
    make_pusher(sqlite_store, platform, clock).startService()
    assert set(statuses(sqlite_store).values()) == {"pending"}
    clock.advance(1)
    assert set(statuses(sqlite_store).values()) == {"pushed"}
    [refusal] = [r for r in caplog.records if "event=platform.auth_refused" in r.getMessage()]
    assert refusal.levelname == "ERROR" and "check [platform] app_id and secret" in refusal.getMessage()


@pytest.mark.parametrize("status", [400, 413])
def test_a_refused_batch_is_halved_until_the_record_at_fault_stands_alone(sqlite_store: Store, status: int) -> None:
    ids = add_call_ratings(sqlite_store, 16)
    platform = ScriptedPlatform()
    platform.refuse_batches_with = ids[11]
    if status == 413:
        platform.script.append(HttpAnswer(413, b""))
    make_pusher(sqlite_store, platform, Clock()).startService()
    rows = outbox_rows(sqlite_store)
    assert rows[ids[11]]["status"] == "rejected"
    assert rows[ids[11]]["rejected_reason"].startswith("the platform refused the batch with 400")
    assert [r for r in ids if rows[r]["status"] == "pushed"] == ids[:11] + ids[12:]
    assert len(platform.batches) <= 1 + 2 * 4  # 16 → 8 → 4 → 2 → 1


def test_a_proxy_refusing_everything_with_400_sets_nothing_aside(sqlite_store: Store) -> None:
    """SPEC R7.2: nginx's HTML 400 (a plain-HTTP URL for an HTTPS port) is not a bad record: keep retrying."""
    ids = add_call_ratings(sqlite_store, 8)
    platform = ScriptedPlatform()
    html = HttpAnswer(400, b"<html><center><h1>400 Bad Request</h1></center></html>")
    platform.script.extend([html] * 15)  # 8 → 4 → 2 → 1, every request refused
    clock = Clock()
    pusher = make_pusher(sqlite_store, platform, clock)
    pusher.startService()
    assert set(statuses(sqlite_store).values()) == {"pending"}
    assert pusher.stats.rejected == 0 and pusher.stats.consecutive_failures == 1
    clock.advance(5)  # the proxy is fixed: everything goes
    assert set(statuses(sqlite_store).values()) == {"pushed"} and set(platform.sent) >= set(ids)
    pusher.stopService()


def test_a_bad_record_alone_in_the_outbox_refused_by_the_platform_is_set_aside_at_once(sqlite_store: Store) -> None:
    [bad] = add_call_ratings(sqlite_store, 1)
    platform = ScriptedPlatform()
    platform.refuse_batches_with = bad  # the platform's own JSON answer
    pusher = make_pusher(sqlite_store, platform, Clock())
    pusher.startService()
    assert statuses(sqlite_store)[bad] == "rejected"
    assert pusher.stats.consecutive_failures == 0  # not a failure of the platform
    pusher.stopService()


def test_a_record_alone_refused_by_a_page_not_the_platforms_waits_until_another_goes_through(
    sqlite_store: Store,
) -> None:
    [bad] = add_call_ratings(sqlite_store, 1)
    platform = ScriptedPlatform()
    platform.refuse_batches_with = bad
    platform.refusal = b"<html><h1>400 Bad Request</h1></html>"  # a proxy's page: maybe every record alike
    clock = Clock()
    pusher = make_pusher(sqlite_store, platform, clock)
    pusher.startService()
    assert statuses(sqlite_store)[bad] == "pending"  # refused alone, nothing taken: not judged yet
    good = add_matter_rating(sqlite_store, "M-GOOD")
    clock.advance(5)
    assert statuses(sqlite_store) == {bad: "rejected", good: "pushed"}
    pusher.stopService()


def test_no_body_is_larger_than_the_limit(sqlite_store: Store) -> None:
    """PLATFORM.md: ≤ 1 MiB per body (a small limit here, so that a few records fill it)."""
    ids = [add_matter_rating(sqlite_store, f"M-{n}", matter_code="X", matter_name="办" * 150) for n in range(20)]
    platform = ScriptedPlatform()
    make_pusher(sqlite_store, platform, Clock(), max_body_bytes=4000).startService()
    assert max(platform.sizes) <= 4000 and len(platform.batches) > 2
    assert platform.sent == ids


def test_an_idle_pusher_polls_every_quarter_second_quickly_after_work_and_at_once_when_woken(
    sqlite_store: Store,
) -> None:
    """SPEC R7.1: within seconds (a rating stored by another process: within 250 ms), and at
    once for writers that call wake()."""
    platform = ScriptedPlatform()
    clock = Clock()
    pusher = make_pusher(sqlite_store, platform, clock, busy_window=5)
    pusher.startService()
    add_call_ratings(sqlite_store, 1)
    clock.advance(0.24)
    assert platform.batches == []
    clock.advance(0.01)
    assert len(platform.batches) == 1
    add_call_ratings(sqlite_store, 1, start=1)
    clock.advance(0.05)  # just after work, it looks again every 50 ms
    assert len(platform.batches) == 2
    clock.advance(10)  # long idle: every 250 ms again
    add_call_ratings(sqlite_store, 1, start=2)
    pusher.wake()
    assert len(platform.batches) == 3


def test_stopping_lets_the_request_in_flight_settle(sqlite_store: Store) -> None:
    ids = add_call_ratings(sqlite_store, 2)
    platform = ScriptedPlatform()
    answer: defer.Deferred[HttpAnswer] = defer.Deferred()
    platform.script.append(answer)
    pusher = make_pusher(sqlite_store, platform, Clock())
    pusher.startService()
    stopped = pusher.stopService()
    assert not stopped.called
    answer.callback(ack(accepted=ids))
    assert stopped.called and set(statuses(sqlite_store).values()) == {"pushed"}


def test_a_row_that_cannot_be_mapped_is_set_aside_and_the_rest_go_on(sqlite_store: Store) -> None:
    ids = add_call_ratings(sqlite_store, 2)
    now = datetime.now(UTC)
    with sqlite_store.engine.begin() as connection:
        connection.execute(
            insert(outbox).values(
                record_id="ev-ORPHAN", record_type="evaluation", status="pending", next_attempt_at=now, created_at=now
            )
        )
    platform = ScriptedPlatform()
    make_pusher(sqlite_store, platform, Clock()).startService()
    rows = outbox_rows(sqlite_store)
    assert platform.sent == ids and rows["ev-ORPHAN"]["status"] == "rejected"
    assert "no longer in the store" in rows["ev-ORPHAN"]["rejected_reason"]


# -- on a real reactor, against the strict test platform on loopback ----------------------------


async def until(reactor: Any, condition: Callable[[], bool], timeout: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        await sleep(reactor, 0.02)
    return time.monotonic() - started


class Running:
    """A pusher on a real reactor with its store threads, and the test platform."""

    def __init__(self, reactor: Any, store: Store, *, secret: str = "test-secret", **options: Any) -> None:
        self.server: PlatformServer = listen(reactor)
        self.store = DeferredStore(store, reactor)
        self.client = PlatformClient(reactor, self.server.url, "gw-test", secret, options.pop("timeout", 2.0))
        options = {"backoff": Backoff(initial=0.05, maximum=0.3), "batch_size": 50, **options}
        self.pusher = Pusher(self.store, self.client, reactor, app_id="gw-test", **options)
        self.store.startService()
        self.pusher.startService()

    async def stop(self) -> None:
        await self.pusher.stopService()
        await self.store.stopService()


def test_an_answer_ended_by_closing_the_connection_is_a_whole_answer() -> None:
    """HTTP/1.1 lets a server end a body without a length by closing: that 200 acknowledges the batch."""
    answer = b'{"code": 0, "accepted": ["ev-1"], "duplicates": [], "rejected": []}'
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(10)

    def serve() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.settimeout(10)
            request = b""
            while b"\r\n\r\n" not in request:
                request += connection.recv(65536)
            head, _, body = request.partition(b"\r\n\r\n")
            length = int(
                next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")).split(b":")[1]
            )
            while len(body) < length:
                body += connection.recv(65536)
            connection.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n" + answer
            )

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"

    async def post(reactor: Any) -> HttpAnswer:
        client = PlatformClient(reactor, url, "gw-test", "secret", 5.0)
        return await client.post_batch(b'{"appId": "gw-test", "batchId": "b-1", "records": []}')

    try:
        result = run_on_reactor(post)
    finally:
        server.join(10)
        listener.close()
    assert (result.status, result.body) == (200, answer)


def assert_pushed_only_on_acknowledgement(store: Store, server: PlatformServer) -> None:
    """Each pushed row names a batch whose acknowledgement of that very record reached the wire."""
    acknowledged = server.platform.acknowledgements()
    for record_id, row in outbox_rows(store).items():
        if row["status"] == "pushed":
            assert (row["pushed_batch_id"], record_id) in acknowledged


def test_every_record_arrives_through_errors_slow_answers_and_dropped_connections(sqlite_store: Store) -> None:
    """SPEC R7.2: 500, 429, 503, a timeout and a lost answer are retried; nothing is lost or doubled."""
    ids = add_call_ratings(sqlite_store, 400)

    async def scenario(reactor: Any) -> None:
        running = Running(reactor, sqlite_store, timeout=0.5)
        running.server.platform.faults.extend(
            [
                Fault("status", status=500, count=2),
                Fault("status", status=429, retry_after="1"),
                Fault("drop"),  # taken, but the answer never arrives
                Fault("delay", seconds=1.5),  # taken, answered after the gateway gave up
                Fault("status", status=503, retry_after="0"),
                Fault("drop"),
            ]
        )
        await until(reactor, lambda: set(statuses(sqlite_store).values()) == {"pushed"}, 10, "every record pushed")
        await running.stop()
        platform = running.server.platform
        summary = platform.summary()
        assert sorted(platform.records) == sorted(ids)
        assert summary["acknowledgedMoreThanOnce"] == []  # once acknowledged, never sent again
        assert len(summary["receivedMoreThanOnce"]) >= 100  # the lost answers' records came again
        assert_pushed_only_on_acknowledgement(sqlite_store, running.server)
        assert len(platform.nonces) == len(platform.log)  # a fresh nonce for every request

    run_on_reactor(scenario)


def test_invalid_records_are_set_aside_with_the_platforms_reason(sqlite_store: Store) -> None:
    good = add_call_ratings(sqlite_store, 20)
    bad = [
        add_matter_rating(sqlite_store, f"M-{n}", matter_code="X1", matter_name="户口迁移", department_code="DEPT-1")
        for n in range(3)
    ]

    async def scenario(reactor: Any) -> None:
        running = Running(reactor, sqlite_store)
        await until(reactor, lambda: "pending" not in statuses(sqlite_store).values(), 5, "all settled")
        await sleep(reactor, 0.3)
        await running.stop()
        rows = outbox_rows(sqlite_store)
        assert [rows[r]["status"] for r in good] == ["pushed"] * 20
        for record_id in bad:
            assert rows[record_id]["status"] == "rejected"
            assert rows[record_id]["rejected_reason"].startswith("deptCode: must be an 18-character")
        summary = running.server.platform.summary()
        assert summary["rejectedUnchanged"] == 0 and summary["receivedMoreThanOnce"] == []

    run_on_reactor(scenario)


def test_a_platform_that_goes_down_and_comes_back_gets_everything(sqlite_store: Store) -> None:
    """SPEC R7.2: nothing is dropped while it is down; after it, full speed at once."""
    ids = add_call_ratings(sqlite_store, 1500)

    async def scenario(reactor: Any) -> None:
        running = Running(reactor, sqlite_store, batch_size=100, workers=1)
        platform = running.server.platform
        # Two batches go through; the third finds the platform going down for 1.5 s, mid-push.
        platform.faults.extend([Fault("ok", count=2), Fault("down", seconds=1.5)])
        await until(reactor, lambda: running.pusher.stats.consecutive_failures >= 3, 5, "failures while down")
        assert len(platform.records) == 200
        await until(reactor, lambda: len(platform.records) == len(ids), 5, "everything after the outage")
        recovery = reactor.seconds() - running.server.started_at
        assert recovery < 1.0  # backoff capped at 0.3 s: no record waits on a timer of its own
        await until(reactor, lambda: set(statuses(sqlite_store).values()) == {"pushed"}, 5, "all marked")
        await running.stop()
        assert platform.summary()["acknowledgedMoreThanOnce"] == []
        assert_pushed_only_on_acknowledgement(sqlite_store, running.server)

    run_on_reactor(scenario)


def test_a_rating_stored_in_this_process_is_pushed_at_once_not_at_the_next_poll(sqlite_store: Store) -> None:
    """SPEC R7.1: a commit that writes the outbox wakes the pusher, whichever channel wrote it."""

    async def scenario(reactor: Any) -> None:
        running = Running(reactor, sqlite_store, idle_poll=30.0, commits_from=reactor)
        await sleep(reactor, 0.2)  # idle now, its next poll 30 s away
        [record_id] = await running.store.run(add_call_ratings, sqlite_store, 1)
        waited = await until(reactor, lambda: record_id in running.server.platform.records, 2, "pushed")
        assert waited < 0.5
        await running.stop()

    run_on_reactor(scenario)


def test_case_updates_reach_the_platform_which_keeps_the_highest_version(sqlite_store: Store) -> None:
    """SPEC R4.1, R7.1: each version of a bad-rating case is a record; the platform keeps the latest."""
    [evaluation] = add_call_ratings(sqlite_store, 1)
    box = Outbox(sqlite_store)
    due = RATED + timedelta(days=1)
    with sqlite_store.engine.begin() as connection:
        rating_id = connection.execute(select(ratings.c.id).where(ratings.c.record_id == evaluation)).scalar_one()
        case_id = connection.execute(
            insert(bad_rating_cases).values(
                case_no="CP2026112200017",
                rating_id=rating_id,
                status="opened",
                version=1,
                contact_due=due,
                rectify_due=due,
                feedback_due=due,
                created_at=RATED,
                updated_at=RATED,
            )
        ).inserted_primary_key[0]
        box.enqueue_case_update(connection, case_id)
        connection.execute(
            update(bad_rating_cases).where(bad_rating_cases.c.id == case_id).values(status="contacted", version=2)
        )
        box.enqueue_case_update(connection, case_id)

    async def scenario(reactor: Any) -> None:
        running = Running(reactor, sqlite_store)
        await until(reactor, lambda: set(statuses(sqlite_store).values()) == {"pushed"}, 5, "all pushed")
        await running.stop()
        platform = running.server.platform
        assert {"case-CP2026112200017-v1", "case-CP2026112200017-v2", evaluation} == set(platform.records)
        assert platform.cases["CP2026112200017"]["status"] == "contacted"
        assert platform.records["case-CP2026112200017-v1"]["evaluationRecordId"] == evaluation

    run_on_reactor(scenario)


def test_seeded_ratings_are_the_rows_the_store_writes(sqlite_store: Store) -> None:
    """The bulk seeding of the benchmark and the two-instance test matches Store.add_rating."""
    [stored] = add_call_ratings(sqlite_store, 1, start=7)
    [seeded] = seed_call_ratings(sqlite_store, 1, start=8, rated_at=RATED)
    records = {item.record_id: platform_record(item) for item in Outbox(sqlite_store).claim("gw-a", 10, lease=60)}
    assert set(records[stored]) == set(records[seeded])
    same = {"recordType", "taskName", "proStatus", "pf", "assessTime", "assessNumber", "isDefault", "userProp"}
    assert {k: records[stored][k] for k in same} == {k: records[seeded][k] for k in same}


def test_a_wrong_secret_pushes_nothing_and_is_logged(sqlite_store: Store, caplog: pytest.LogCaptureFixture) -> None:
    add_call_ratings(sqlite_store, 5)

    async def scenario(reactor: Any) -> None:
        running = Running(reactor, sqlite_store, secret="not-the-secret")
        await until(reactor, lambda: running.pusher.stats.failures >= 2, 5, "two refusals")
        await running.stop()
        assert running.server.platform.records == {}
        assert running.server.platform.auth_failures[0] == "X-HCP-Signature does not match"

    run_on_reactor(scenario)
    assert set(statuses(sqlite_store).values()) == {"pending"}
    assert any("event=platform.auth_refused" in r.getMessage() for r in caplog.records)


# -- two `gateway run` processes on one PostgreSQL ----------------------------------------------

#: The acceptance figure; GATEWAY_TEST_PUSH_RECORDS changes it (it takes about 6 s on 2 cores).
INSTANCES_RECORDS = int(os.environ.get("GATEWAY_TEST_PUSH_RECORDS", "20000"))


@pytest.fixture
def platform_process(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway.testing.platform", "--port", "0", "--app-id", "gw-it", "--secret", "s3cret"],
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "platform.log").open("wb"),
    )
    assert process.stdout is not None
    line = process.stdout.readline().decode()
    url = line.split("url=")[1].split()[0]
    yield url, process
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=10)


def control(url: str, action: str) -> Any:
    with urllib.request.urlopen(f"{url}/_control/{action}", timeout=10) as response:
        return json.loads(response.read())


def launch_gateway(folder: Path, environment: dict[str, str]) -> tuple[subprocess.Popen[bytes], Path, str]:
    """``gateway run`` without waiting for it, so that two instances start together."""
    from tests.test_gateway_process import free_port

    folder.mkdir()
    http = free_port()
    env = {
        **os.environ,
        **environment,
        "GATEWAY_STORE_DATA_DIR": str(folder / "data"),
        "GATEWAY_HTTP_PORT": str(http),
        "GATEWAY_AGI_PORT": str(free_port()),
    }
    log = folder / "gateway.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run"], env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT
    )
    return process, log, f"http://127.0.0.1:{http}/health"


def wait_healthy(process: subprocess.Popen[bytes], log: Path, health: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, f"gateway exited with {process.returncode}:\n{log.read_text()}"
        try:
            with urllib.request.urlopen(health, timeout=5):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"gateway not healthy within 30 s:\n{log.read_text()}")


def push_with_two_instances(
    tmp_path: Path, database_url: str, platform_url: str, records: int, batch_size: int
) -> None:
    """Ratings stored first, then two instances started together push them (SPEC R7.2)."""
    engine = make_engine(database_url)
    migrate.upgrade(engine)
    store = Store(engine, make_protector())
    seed_call_ratings(store, records, rated_at=RATED)
    environment = {
        "GATEWAY_STORE_URL": database_url,
        "GATEWAY_PRIVACY_ENCRYPTION_KEY": base64.b64encode(os.urandom(32)).decode(),
        "GATEWAY_PRIVACY_PHONE_HASH_KEY": base64.b64encode(os.urandom(32)).decode(),
        "GATEWAY_PLATFORM_ENABLED": "true",
        "GATEWAY_PLATFORM_URL": platform_url,
        "GATEWAY_PLATFORM_APP_ID": "gw-it",
        "GATEWAY_PLATFORM_SECRET": "s3cret",
        "GATEWAY_PLATFORM_BATCH_SIZE": str(batch_size),
        "GATEWAY_LOG_LEVEL": "debug",
    }
    started = time.monotonic()
    gateways = [launch_gateway(tmp_path / f"gw{n}", environment) for n in range(2)]
    try:
        for gateway in gateways:
            wait_healthy(*gateway)
        deadline = time.monotonic() + 60
        while control(platform_url, "summary")["held"] < records and time.monotonic() < deadline:
            time.sleep(0.1)
        elapsed = time.monotonic() - started
    finally:
        for process, _, _ in gateways:
            process.send_signal(signal.SIGTERM)
        for process, _, _ in gateways:
            process.wait(timeout=30)
    summary = control(platform_url, "summary")
    assert summary["held"] == records, f"{summary['held']} of {records} arrived in {elapsed:.1f} s"
    assert summary["receivedMoreThanOnce"] == []  # no record was pushed by both instances
    assert summary["rejected"] == {} and summary["authFailures"] == 0
    rows = statuses(store)
    assert len(rows) == records and set(rows.values()) == {"pushed"}
    batches = [log.read_text().count("event=platform.pushed") for _, log, _ in gateways]
    assert all(batches), f"both instances push: batches per instance {batches}"
    print(f"{records} records by two instances in {elapsed:.1f} s (with start-up); batches per instance {batches}")
    engine.dispose()


@pytest.mark.slow
def test_two_instances_on_one_postgresql_push_each_record_once(
    tmp_path: Path, postgresql_fresh_url: str, platform_process: tuple[str, Any]
) -> None:
    """SPEC R7.2 with several instances: each of 20,000 records arrives, none is pushed by both."""
    push_with_two_instances(tmp_path, postgresql_fresh_url, platform_process[0], INSTANCES_RECORDS, batch_size=500)


def test_a_platform_without_the_shared_phone_hash_key_is_said_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """PLATFORM.md userPhoneHash: warned, not refused (a new key would unlink stored opt-outs, R3.8)."""
    from gateway.config import load_config
    from gateway.platform.pusher import build_pusher

    environ = {
        "GATEWAY_STORE_DATA_DIR": str(tmp_path),
        "GATEWAY_PLATFORM_ENABLED": "true",
        "GATEWAY_PLATFORM_URL": "https://hcp.example.gov.cn/api",
        "GATEWAY_PLATFORM_APP_ID": "gw",
        "GATEWAY_PLATFORM_SECRET": "s",
    }
    with caplog.at_level("WARNING", logger="gateway.platform"):
        build_pusher(load_config(None, environ=environ), Clock(), SyncStore(None))  # type: ignore[arg-type]
    assert "event=platform.own_phone_hash_key" in caplog.text
    caplog.clear()
    keyed = {**environ, "GATEWAY_PRIVACY_PHONE_HASH_KEY": base64.b64encode(os.urandom(32)).decode()}
    with caplog.at_level("WARNING", logger="gateway.platform"):
        build_pusher(load_config(None, environ=keyed), Clock(), SyncStore(None))  # type: ignore[arg-type]
    assert "own_phone_hash_key" not in caplog.text
