"""The operator API (SPEC R5.1, R5.2, R7.2, R7.3) on a live gateway over loopback.

Look-ups by every identifier, keyset pages, phones masked; the supervisors' call-back view and
its audit record; rejected records for admins; reconciliation; /health's components.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import pytest
from sqlalchemy import select

from gateway.intake import ServiceRecordInput
from gateway.platform.reconcile import reconcile
from gateway.rating import Channel, Level, ServiceKind
from gateway.testing.platform import SHANGHAI, listen
from storage.outbox import Outbox
from storage.queries import audit_entries
from storage.schema import service_records
from storage.store import Store
from tests.live_gateway import LiveGateway
from tests.test_gateway_process import free_port

PHONE = "+8613912345678"
MASKED = "139****5678"
BASE = datetime(2026, 11, 20, 2, 0, tzinfo=UTC)  # 10:00 in Beijing


def add_rating(
    store: Store,
    external_id: str,
    *,
    level: Level = Level.SATISFIED,
    channel: Channel = Channel.VOICE,
    rated_at: datetime = BASE,
    kind: ServiceKind = ServiceKind.CALL,
    **fields: str,
) -> str:
    """A service record (created or updated) and one rating of it; the rating's recordId."""
    store.upsert_service_records([ServiceRecordInput(id=external_id, kind=kind, **fields)])  # type: ignore[arg-type]
    with store.engine.begin() as connection:
        pk = connection.execute(
            select(service_records.c.id).where(service_records.c.external_id == external_id)
        ).scalar_one()
        return store.add_rating(
            connection, service_record_id=pk, level=level, channel=channel, raw_input="2", rated_at=rated_at
        )[1]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    with LiveGateway(tmp_path_factory.mktemp("operator")) as running:
        store = running.gateway.store
        add_rating(
            store,
            "1795370491.70",
            call_id="1795370491.70",
            linked_id="1795370491.00",
            work_order="GD2026112000123",
            agent_id="A1024",
            mobile=PHONE,
        )
        add_rating(
            store,
            "BJ2026000001",
            kind=ServiceKind.MATTER,
            channel=Channel.SMS,
            level=Level.DISSATISFIED,
            rated_at=BASE + timedelta(hours=30),
            matter_code="11110000000000000X4000117004000",
            department_code="11110000000013338W",
            mobile=PHONE,
        )
        yield running


@pytest.fixture(scope="module")
def operator(live: LiveGateway) -> str:
    return live.token("operator", "desk-1")


@pytest.fixture(scope="module")
def supervisor(live: LiveGateway) -> str:
    return live.token("supervisor", "alice")


@pytest.fixture(scope="module")
def admin(live: LiveGateway) -> str:
    return live.token("admin", "root")


@pytest.mark.parametrize(
    ("query", "service_id"),
    [
        ("call_id=1795370491.70", "1795370491.70"),
        ("linked_id=1795370491.00", "1795370491.70"),
        ("work_order=GD2026112000123", "1795370491.70"),
        ("agent=A1024", "1795370491.70"),
        ("matter=11110000000000000X4000117004000", "BJ2026000001"),
        ("department=11110000000013338W", "BJ2026000001"),
        ("service_id=BJ2026000001", "BJ2026000001"),
        ("from=2026-11-21", "BJ2026000001"),  # a date alone: Beijing time, from its start
        ("to=2026-11-20", "1795370491.70"),  # a date alone: to its end
        ("from=2026-11-20T09:00:00%2B08:00&to=2026-11-20T11:00:00%2B08:00", "1795370491.70"),
    ],
)
def test_operators_find_ratings_by_each_identifier_with_the_phone_masked(
    live: LiveGateway, operator: str, query: str, service_id: str
) -> None:
    """SPEC R5.2 look-ups; SPEC R5.1: the number masked in every answer."""
    status, _, raw = live.request("GET", f"/v1/ratings?{query}", token=operator)
    assert status == 200, raw
    body = json.loads(raw)
    assert [r["service"]["id"] for r in body["ratings"]] == [service_id]
    assert body["ratings"][0]["service"]["mobileMasked"] == MASKED
    assert "13912345678" not in raw.decode() and body["next"] is None and body["nextCursor"] is None


def test_filters_combine_and_a_mismatch_finds_nothing(live: LiveGateway, operator: str) -> None:
    assert live.get("/v1/ratings?agent=A1024&matter=11110000000000000X4000117004000", operator)[1]["ratings"] == []
    assert len(live.get("/v1/ratings?agent=A1024&work_order=GD2026112000123", operator)[1]["ratings"]) == 1


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("", "give at least one of"),
        ("colour=red&agent=A1", "unknown query parameter(s): colour"),
        ("agent=", "1 to 200 characters"),
        ("agent=A%00B", "control characters"),
        ("from=yesterday", "from: 'yesterday' is not an ISO 8601 time"),
        ("to=9999-12-31", "to: "),
        ("from=1850-01-01", "from: is out of range: give a time in the years 1900 to 9000"),
        ("from=2026-11-21&to=2026-11-20T00:00:00%2B08:00", "to must be later than from"),
        ("agent=A1&limit=0", "limit must be between 1 and 1000"),
        ("agent=A1&limit=ten", "limit must be a whole number"),
        ("agent=A1&cursor=bm9wZQ", "cursor is not one this API gave out"),
        ("agent=A1&cursor=!!!", "cursor is not one this API gave out"),
        ("agent=A1&cursor=bm9wZQ&offset=3", "cursor or offset, not both"),
    ],
)
def test_bad_look_ups_are_refused_with_a_sentence(live: LiveGateway, operator: str, query: str, words: str) -> None:
    status, body = live.get(f"/v1/ratings?{query}", operator)
    assert status == 400 and words in body["error"]


def test_pages_follow_next_to_the_end_without_repeats_while_ratings_arrive(live: LiveGateway, operator: str) -> None:
    """Keyset pages: a rating stored between two pages neither shifts nor repeats a row."""
    store = live.gateway.store
    same_moment = BASE + timedelta(days=3)
    ids = [add_rating(store, f"PAGE-{n:02d}", agent_id="A-PAGES", rated_at=same_moment) for n in range(12)]
    ids += [
        add_rating(store, f"PAGE-{n:02d}", agent_id="A-PAGES", rated_at=same_moment + timedelta(minutes=n))
        for n in range(12, 25)
    ]
    seen: list[str] = []
    path: str | None = "/v1/ratings?agent=A-PAGES&limit=10"
    pages = 0
    while path is not None:
        status, body = live.get(path, operator)
        assert status == 200, body
        seen += [r["recordId"] for r in body["ratings"]]
        path = body["next"]
        assert (path is None) == (body["nextCursor"] is None)
        pages += 1
        if pages == 1:  # an earlier rating and a later one arrive while the operator reads
            add_rating(store, "PAGE-EARLY", agent_id="A-PAGES", rated_at=BASE)
            ids.append(add_rating(store, "PAGE-LATE", agent_id="A-PAGES", rated_at=same_moment + timedelta(days=1)))
    assert pages == 3
    assert seen == ids  # every one once, in order; the earlier one belongs to pages already read
    status, body = live.get("/v1/ratings?agent=A-PAGES&limit=5&offset=5", operator)
    assert status == 200 and [r["recordId"] for r in body["ratings"]] == ids[4:9]  # PAGE-EARLY comes first now


def test_attempts_are_listed_and_flagged(live: LiveGateway, operator: str) -> None:
    """SPEC R1.4: a second rating of the same call is kept as an attempt, not counted."""
    store = live.gateway.store
    add_rating(store, "ATTEMPT-1", agent_id="A-ATTEMPT", rated_at=BASE)
    add_rating(
        store, "ATTEMPT-1", agent_id="A-ATTEMPT", rated_at=BASE + timedelta(minutes=1), level=Level.VERY_DISSATISFIED
    )
    ratings = live.get("/v1/ratings?agent=A-ATTEMPT", operator)[1]["ratings"]
    assert [(r["level"], r["isAttempt"]) for r in ratings] == [(4, False), (1, True)]


def test_a_supervisor_sees_the_number_to_call_back_and_the_view_is_audited_without_it(
    live: LiveGateway, operator: str, supervisor: str, admin: str
) -> None:
    """SPEC R5.1: unmasked only to those who call back, every view audited, never the number in the log."""
    record_id = live.get("/v1/ratings?service_id=BJ2026000001", operator)[1]["ratings"][0]["recordId"]
    before = len(audit_entries(live.gateway.store, action="contact.view"))
    for token in (operator, admin):
        status, body = live.get(f"/v1/ratings/{record_id}/contact", token)
        assert status == 403 and "supervisor" in body["error"]
    assert live.get(f"/v1/ratings/{record_id}/contact")[0] == 401
    status, body = live.get(f"/v1/ratings/{record_id}/contact", supervisor)
    assert status == 200
    assert body == {
        "serviceId": "BJ2026000001",
        "kind": "matter",
        "mobile": PHONE,
        "mobileMasked": MASKED,
        "audited": True,
        "recordId": record_id,
        "level": 2,
    }
    status, body = live.get("/v1/service-records/1795370491.70/contact", supervisor)
    assert status == 200 and body["mobile"] == PHONE and body["serviceId"] == "1795370491.70"
    assert live.get("/v1/ratings/ev-UNKNOWN/contact", supervisor)[0] == 404
    entries = audit_entries(live.gateway.store, action="contact.view")
    assert len(entries) == before + 2  # refused and unknown look-ups show nothing and are not views
    latest, previous = entries[0], entries[1]
    assert latest["actor"] == previous["actor"] == "supervisor:alice"
    assert latest["subject"] == "service:1795370491.70"
    assert previous["subject"] == f"rating:{record_id}"
    assert previous["detail"] == {
        "role": "supervisor",
        "serviceId": "BJ2026000001",
        "phoneShown": True,
        "ratingRecordId": record_id,
    }
    assert "13912345678" not in json.dumps([e["detail"] for e in entries] + [e["subject"] for e in entries])


def test_admins_see_records_the_platform_rejected_with_its_reason(live: LiveGateway, operator: str, admin: str) -> None:
    """SPEC R7.2: set aside with the reason and reported."""
    store = live.gateway.store
    rejected = [add_rating(store, f"REJ-{n}", agent_id="A-REJ") for n in range(3)]
    Outbox(store).mark_rejected({record_id: f"deptCode: bad code {n}" for n, record_id in enumerate(rejected)})
    assert live.get("/v1/outbox/rejected", operator)[0] == 403
    status, body = live.get("/v1/outbox/rejected?limit=2", admin)
    assert status == 200
    assert [(r["recordId"], r["reason"], r["recordType"]) for r in body["rejected"]] == [
        (rejected[0], "deptCode: bad code 0", "evaluation"),
        (rejected[1], "deptCode: bad code 1", "evaluation"),
    ]
    status, rest = live.get(body["next"], admin)
    assert [r["recordId"] for r in rest["rejected"]] == rejected[2:] and rest["next"] is None


def test_reconciliation_gives_the_reports_figures_to_admins_supervisors_and_the_platform(
    live: LiveGateway, operator: str, admin: str, supervisor: str
) -> None:
    """SPEC R7.3: the same report as ``gateway reconcile --json`` (platform not configured here)."""
    expected = reconcile(live.gateway.store, date(2026, 11, 21), None).as_json()
    for token in (admin, supervisor, live.token("platform", "central")):
        status, body = live.get("/v1/reconciliation?date=2026-11-21", token)
        assert status == 200 and body == expected
    assert body["totals"]["stored"] == 1 and body["rows"][0]["pf"] == "7" and body["rows"][0]["level"] == 2
    assert live.get("/v1/reconciliation?date=2026-11-21", operator)[0] == 403
    for bad in ("", "?date=21.11.2026", "?date=2026-02-30", "?date=2026-11-21&x=1"):
        assert live.get(f"/v1/reconciliation{bad}", admin)[0] == 400


def test_path_ids_with_control_characters_are_not_found(live: LiveGateway, supervisor: str) -> None:
    assert live.get(f"/v1/service-records/{quote(chr(0))}/contact", supervisor)[0] == 404


def test_health_reports_the_store_and_the_agi_listener(live: LiveGateway) -> None:
    status, body = live.get("/health")
    assert status == 200 and body["status"] == "ok"
    assert body["components"]["store"] == {"status": "ok"}
    agi = body["components"]["agi"]
    assert agi["status"] == "ok" and agi["port"] == live.port("agi") and agi["activeSessions"] == 0


def test_health_checks_are_pluggable_and_a_component_down_answers_503(live: LiveGateway) -> None:
    """The lead's smsc (or any) component: one entry in Gateway.health_checks."""
    checks = live.gateway.health_checks

    def broken() -> dict[str, object]:
        raise RuntimeError("secret detail 13912345678")

    try:
        checks["smsc"] = lambda: {"status": "degraded", "bound": True}
        status, body = live.get("/health")
        assert status == 200 and body["status"] == "degraded" and body["components"]["smsc"]["bound"] is True
        checks["broken"] = broken
        status, body = live.get("/health")
        assert status == 503 and body["status"] == "down"
        assert body["components"]["broken"] == {"status": "down", "error": "RuntimeError"}
    finally:
        checks.pop("smsc", None)
        checks.pop("broken", None)
    assert live.get("/health")[0] == 200


def test_health_shows_platform_reachability_from_the_pusher(tmp_path: Path) -> None:
    """Issue 5 §4: the pusher's last success and failure; an unreachable platform is degraded, not down."""
    environ = {
        "GATEWAY_PLATFORM_ENABLED": "true",
        "GATEWAY_PRIVACY_PHONE_HASH_KEY": "c2hhcmVkLXBob25lLWhhc2gta2V5LWZvci10ZXN0cyE=",  # the shared key
        "GATEWAY_PLATFORM_URL": "http://127.0.0.1:9",  # discard port: nothing listens
        "GATEWAY_PLATFORM_APP_ID": "gw-test",
        "GATEWAY_PLATFORM_SECRET": "s",
        "GATEWAY_PLATFORM_TIMEOUT": "1s",
    }
    with LiveGateway(tmp_path, environ) as live:
        status, body = live.get("/health")
        assert status == 200 and body["components"]["pusher"]["platform"] == "unknown"
        add_rating(live.gateway.store, "PUSH-1", agent_id="A1")
        pusher = live.gateway.root.getServiceNamed("pusher")
        live.call(pusher.wake)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            status, body = live.get("/health")
            if body["components"]["pusher"]["lastFailure"]:
                break
            time.sleep(0.02)
        pusher_state = body["components"]["pusher"]
        assert status == 200 and body["status"] == "degraded"
        assert pusher_state["status"] == "degraded" and pusher_state["platform"] == "unreachable"
        assert pusher_state["lastSuccess"] is None and pusher_state["consecutiveFailures"] >= 1
        assert datetime.fromisoformat(pusher_state["lastFailure"]) > datetime.now(UTC) - timedelta(minutes=1)


def test_reconciliation_asks_the_platform_and_compares(tmp_path: Path) -> None:
    """SPEC R7.3 with the strict test platform: stored, pushed and the platform's counts agree."""
    port = free_port()
    environ = {
        "GATEWAY_PLATFORM_ENABLED": "true",
        "GATEWAY_PRIVACY_PHONE_HASH_KEY": "c2hhcmVkLXBob25lLWhhc2gta2V5LWZvci10ZXN0cyE=",  # the shared key
        "GATEWAY_PLATFORM_URL": f"http://127.0.0.1:{port}",
        "GATEWAY_PLATFORM_APP_ID": "gw-test",
        "GATEWAY_PLATFORM_SECRET": "test-secret",
        "GATEWAY_PLATFORM_TIMEOUT": "2s",
    }
    with LiveGateway(tmp_path, environ) as live:
        admin = live.token("admin")
        day = datetime.now(SHANGHAI).date()
        status, body = live.get(f"/v1/reconciliation?date={day}", admin)
        assert status == 200 and body["platform"]["status"] == "unavailable"  # not listening yet
        assert "cannot be reached" in body["platform"]["error"] and body["consistent"] is False
        live.call(listen, live.reactor, port=port)
        ids = [
            add_rating(live.gateway.store, f"REC-{n}", level=Level(1 + n % 5), rated_at=datetime.now(UTC))
            for n in range(7)
        ]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            status, body = live.get(f"/v1/reconciliation?date={day}", admin)
            if body["totals"]["pushed"] == len(ids):
                break
            time.sleep(0.05)
        assert body["platform"] == {"status": "ok", "error": None}
        assert body["totals"] == {"stored": 7, "pushed": 7, "platform": 7} and body["consistent"] is True
        assert body == reconcile(live.gateway.store, day, live.config.platform).as_json()


def test_a_service_id_with_a_slash_is_reached_percent_encoded(live: LiveGateway, supervisor: str) -> None:
    """Case numbers like ``京办〔2026〕/0012`` carry a slash: ``%2F`` keeps it inside one path segment."""
    add_rating(live.gateway.store, "WO/2026/0012", kind=ServiceKind.MATTER, mobile=PHONE)
    status, body = live.get(f"/v1/service-records/{quote('WO/2026/0012', safe='')}/contact", supervisor)
    assert status == 200 and body["serviceId"] == "WO/2026/0012" and body["mobile"] == PHONE
    assert live.get("/v1/service-records/WO/2026/0012/contact", supervisor)[0] == 404
