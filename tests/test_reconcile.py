"""Reconciliation (SPEC R7.3): the gateway's daily totals beside the platform's, by `gateway reconcile`."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import main
from gateway.config import load_config
from gateway.platform.policy import Backoff
from gateway.platform.pusher import PlatformClient, Pusher
from gateway.platform.reconcile import PlatformUnavailable, Reconciliation, parse_platform_counts
from gateway.platform.records import SHANGHAI
from storage.deferred import DeferredStore
from storage.outbox import DayTotals
from storage.store import Store
from tests.test_pusher import (  # noqa: F401 (platform_process is a fixture)
    RATED,
    add_call_ratings,
    add_matter_rating,
    platform_process,
    run_on_reactor,
    statuses,
    until,
)

DAY = date(2026, 11, 22)


def test_rows_put_each_channel_and_level_side_by_side() -> None:
    totals = DayTotals(
        DAY, stored={"6": {"5": 3, "2": 1}, "7": {"4": 2}}, pushed={"6": {"5": 3, "2": 1}, "7": {"4": 1}}
    )
    totals.pending.append("ev-LATE")
    result = Reconciliation(DAY, totals, {"6": {"5": 3, "2": 1}, "7": {"4": 1}}, "ok")
    assert [(r.pf, r.level, r.stored, r.pushed, r.platform, r.consistent) for r in result.rows] == [
        ("6", 5, 3, 3, 3, True),
        ("6", 2, 1, 1, 1, True),
        ("7", 4, 2, 1, 1, False),
    ]
    assert not result.consistent and result.platform_total == 5


def test_the_platform_holding_more_or_less_than_was_pushed_is_a_difference() -> None:
    totals = DayTotals(DAY, stored={"6": {"5": 1}}, pushed={"6": {"5": 1}})
    assert Reconciliation(DAY, totals, {"6": {"5": 1}}, "ok").consistent
    assert not Reconciliation(DAY, totals, {"6": {"5": 2}}, "ok").consistent
    assert not Reconciliation(DAY, totals, {}, "ok").consistent
    assert Reconciliation(DAY, totals, None, "not configured").consistent
    assert not Reconciliation(DAY, totals, None, "unavailable", "refused").consistent


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        ([], "has no counts"),
        ({"date": "2026-11-21", "counts": {}}, "not 2026-11-22"),
        ({"counts": {"6": 3}}, "channel 6 are not an object"),
        ({"counts": {"7": {"4": None}}}, "not whole numbers"),
        ({"counts": {"7": {"4": "12"}}}, "not whole numbers"),
        ({"counts": {"7": {"4": True}}}, "not whole numbers"),
        ({"counts": {"sms": {"4": 1}}}, "not keyed by pf and level codes"),
        ({"counts": {"7": {"good": 1}}}, "not keyed by pf and level codes"),
        ({"counts": {"７": {"4": 1}}}, "not keyed by pf and level codes"),
    ],
)
def test_a_malformed_platform_answer_is_said_in_words(answer: Any, problem: str) -> None:
    with pytest.raises(PlatformUnavailable, match=problem):
        parse_platform_counts(answer, DAY)


@pytest.mark.slow
def test_gateway_reconcile_prints_stored_pushed_and_the_platforms_counts(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    platform_process: tuple[str, Any],  # noqa: F811
) -> None:
    url = platform_process[0]
    environment = {
        "GATEWAY_STORE_DATA_DIR": str(tmp_path / "data"),
        "GATEWAY_PLATFORM_URL": url,
        "GATEWAY_PLATFORM_APP_ID": "gw-it",
        "GATEWAY_PLATFORM_SECRET": "s3cret",
    }
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    config = load_config(environ=environment)
    store = Store.from_config(config)
    add_call_ratings(store, 10)  # levels 1-5, twice each, by voice
    bad = add_matter_rating(store, "M-1", matter_code="X1", matter_name="户口迁移", department_code="DEPT-1")

    async def push(reactor: Any) -> None:
        threads = DeferredStore(store, reactor)
        client = PlatformClient(reactor, url, "gw-it", "s3cret", 2.0)
        pusher = Pusher(threads, client, reactor, app_id="gw-it", backoff=Backoff(0.05, 0.2))
        threads.startService()
        pusher.startService()
        await until(reactor, lambda: "pending" not in statuses(store).values(), 10, "all settled")
        await pusher.stopService()
        await threads.stopService()

    run_on_reactor(push)
    late = add_call_ratings(store, 2, start=100)  # levels 1 and 2: stored, not pushed yet
    day = RATED.astimezone(SHANGHAI).date().isoformat()

    assert main(["reconcile", "--date", day, "--json"]) == 4
    report = json.loads(capsys.readouterr().out)
    voice = {
        row["level"]: (row["stored"], row["pushed"], row["platform"]) for row in report["rows"] if row["pf"] == "6"
    }
    assert voice == {5: (2, 2, 2), 4: (2, 2, 2), 3: (2, 2, 2), 2: (3, 2, 2), 1: (3, 2, 2)}
    assert report["totals"] == {"stored": 13, "pushed": 10, "platform": 10}
    assert sorted(report["pending"]) == sorted(late)
    assert report["rejected"] == [{"recordId": bad, "reason": report["rejected"][0]["reason"]}]
    assert report["rejected"][0]["reason"].startswith("deptCode:")
    assert report["platform"] == {"status": "ok", "error": None} and report["consistent"] is False

    assert main(["reconcile", "--date", day]) == 4
    text = capsys.readouterr().out
    assert "6   电话       1 非常不满意        3        2         2  <- differs" in text
    assert f"pending (2): {late[0]}, {late[1]}" in text and f"  {bad}: deptCode:" in text

    assert main(["reconcile", "--date", "2020-01-01", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == []
    monkeypatch.setenv("GATEWAY_PLATFORM_URL", "http://127.0.0.1:9")
    main(["reconcile", "--date", day, "--json"])
    answer = json.loads(capsys.readouterr().out)["platform"]
    assert answer["status"] == "unavailable" and "cannot be reached" in answer["error"]
    assert main(["reconcile", "--date", "22/11/2026"]) == 2
    assert "write it YYYY-MM-DD" in capsys.readouterr().err
    assert main(["reconcile", "--date", "0001-01-01"]) == 2  # a sentence, not an OverflowError
    assert "not a day the gateway can have ratings of" in capsys.readouterr().err
