"""The pusher's queries on the outbox, on SQLite and on a real PostgreSQL server (SPEC R7.1-R7.3)."""

from __future__ import annotations

import threading
from datetime import UTC, date, datetime, timedelta

from sqlalchemy import insert, select, update

from gateway.intake import ServiceRecordInput
from gateway.platform.records import CaseFacts, EvaluationFacts
from gateway.rating import Channel, Level, ServiceKind
from storage.outbox import Outbox
from storage.schema import bad_rating_cases, invitations, outbox, ratings, service_records
from storage.store import Store

NOW = datetime(2026, 11, 22, 2, 0, tzinfo=UTC)


def rate_call(store: Store, call_id: str, level: Level = Level.SATISFIED, rated_at: datetime = NOW) -> str:
    with store.engine.begin() as connection:
        pk = store.find_or_create_call_record(
            connection,
            call_id=call_id,
            linked_id=call_id + "0",
            fields={"agent_id": "A1", "work_order": "WO-" + call_id, "completed_at": rated_at - timedelta(seconds=30)},
        )
        _, record_id, counted = store.add_rating(
            connection, service_record_id=pk, level=level, channel=Channel.VOICE, raw_input="2", rated_at=rated_at
        )
    assert counted
    return record_id


def rate_matter(
    store: Store,
    external_id: str,
    *,
    level: Level = Level.VERY_SATISFIED,
    channel: Channel = Channel.SMS,
    rated_at: datetime = NOW,
    is_default: bool = False,
    **fields: object,
) -> str:
    store.upsert_service_records([ServiceRecordInput(id=external_id, kind=ServiceKind.MATTER, **fields)])  # type: ignore[arg-type]
    with store.engine.begin() as connection:
        pk = connection.execute(
            select(service_records.c.id).where(service_records.c.external_id == external_id)
        ).scalar_one()
        _, record_id, _ = store.add_rating(
            connection,
            service_record_id=pk,
            level=level,
            channel=channel,
            raw_input=None,
            rated_at=rated_at,
            is_default=is_default,
        )
    return record_id


def statuses(store: Store) -> dict[str, str]:
    with store.engine.connect() as connection:
        return dict(connection.execute(select(outbox.c.record_id, outbox.c.status)).all())


def test_a_claim_leases_the_oldest_due_rows_to_one_owner(store: Store) -> None:
    ids = [rate_call(store, f"17953704{i}.1") for i in range(5)]
    box = Outbox(store)
    first = box.claim("gw-a", 3, lease=60)
    assert [item.record_id for item in first] == ids[:3]
    assert [item.record_id for item in box.claim("gw-b", 10, lease=60)] == ids[3:]
    assert box.claim("gw-a", 10, lease=60) == []
    assert box.release("gw-b", ids[:3]) == 0  # only the holder gives a lease back
    assert box.release("gw-a", ids[:3], error="timeout") == 3
    assert [item.record_id for item in box.claim("gw-b", 10, lease=60)] == ids[:3]
    assert box.status_counts() == {"pending": 5, "pushed": 0, "rejected": 0, "claimed": 5}


def test_the_lease_of_an_instance_that_died_expires(store: Store) -> None:
    record_id = rate_call(store, "1795370400.1")
    box = Outbox(store)
    now = datetime.now(UTC)
    assert len(box.claim("gw-crashed", 10, lease=30, now=now)) == 1
    assert box.claim("gw-b", 10, lease=30, now=now + timedelta(seconds=29)) == []
    assert [i.record_id for i in box.claim("gw-b", 10, lease=30, now=now + timedelta(seconds=31))] == [record_id]
    assert box.renew("gw-crashed", [record_id], lease=30) == set()  # it lost the lease
    assert box.renew("gw-b", [record_id], lease=30) == {record_id}


def test_acknowledged_rows_are_pushed_and_rejected_rows_are_set_aside_with_the_reason(store: Store) -> None:
    """SPEC R7.2: pushed only on acknowledgement; a rejected record is never claimed again."""
    a, b, c = (rate_call(store, f"179537040{i}.1") for i in range(3))
    box = Outbox(store)
    box.claim("gw-a", 10, lease=60)
    assert box.mark_pushed([a], "batch-1") == 1
    assert box.mark_rejected({b: "deptCode: must be an 18-character unified social credit code"}) == 1
    assert statuses(store) == {a: "pushed", b: "rejected", c: "pending"}
    assert box.mark_pushed([a], "batch-2") == 0  # already done: nothing changes
    with store.engine.connect() as connection:
        row = connection.execute(select(outbox).where(outbox.c.record_id == a)).mappings().one()
    assert row["pushed_batch_id"] == "batch-1" and row["claimed_by"] is None and row["pushed_at"] is not None
    assert box.rejected() == [(b, "deptCode: must be an 18-character unified social credit code")]
    assert box.pending_ids() == [c]
    box.release("gw-a", [c])
    assert [item.record_id for item in box.claim("gw-b", 10, lease=60)] == [c]


def test_claimed_rows_come_with_the_facts_the_platform_needs(store: Store) -> None:
    voice = rate_call(store, "1795370491.70", level=Level.DISSATISFIED)
    batch = [
        rate_matter(store, "B-1", batch_id="bat", matter_code="X1", department_code="D1", area_code="620100"),
    ]
    store.upsert_service_records([ServiceRecordInput(id="B-2", kind=ServiceKind.MATTER, batch_id="bat")])
    default = rate_matter(store, "M-9", channel=Channel.SYSTEM, level=Level.BASICALLY_SATISFIED, is_default=True)
    with store.engine.begin() as connection:
        pk = connection.execute(select(service_records.c.id).where(service_records.c.external_id == "M-9")).scalar_one()
        connection.execute(
            insert(invitations).values(
                service_record_id=pk, channel="email", status="closed", send_after=NOW, created_at=NOW
            )
        )
    items = {item.record_id: item.facts for item in Outbox(store).claim("gw-a", 10, lease=60)}
    call = items[voice]
    assert isinstance(call, EvaluationFacts)
    assert (call.kind, call.project_no, call.call_id, call.linked_id, call.agent_id, call.work_order) == (
        "call",
        "1795370491.70",
        "1795370491.70",
        "1795370491.700",
        "A1",
        "WO-1795370491.70",
    )
    assert call.level == 2 and call.channel == "voice" and call.rated_at == NOW
    matter = items[batch[0]]
    assert isinstance(matter, EvaluationFacts)
    assert (matter.matter_code, matter.department_code, matter.area_code) == ("X1", "D1", "620100")
    assert sorted(item.record_id for item in matter.related) == ["B-1", "B-2"]
    fallback = items[default]
    assert isinstance(fallback, EvaluationFacts)
    assert (fallback.is_default, fallback.invitation_channel) == (True, "email")


def test_a_follow_up_knows_the_rating_it_follows(store: Store) -> None:
    first = rate_call(store, "1795370500.1", level=Level.VERY_DISSATISFIED)
    with store.engine.begin() as connection:
        parent = connection.execute(select(ratings).where(ratings.c.record_id == first)).mappings().one()
        follow_up = connection.execute(
            insert(ratings).values(
                record_id="ev-FOLLOWUP",
                service_record_id=parent["service_record_id"],
                level=4,
                channel="sms",
                is_default=False,
                is_follow_up=True,
                is_attempt=False,
                overall=False,
                parent_rating_id=parent["id"],
                rated_at=NOW + timedelta(days=3),
                created_at=NOW,
            )
        ).inserted_primary_key[0]
        connection.execute(
            insert(outbox).values(
                record_id="ev-FOLLOWUP",
                record_type="evaluation",
                rating_id=follow_up,
                status="pending",
                attempts=0,
                next_attempt_at=NOW,
                created_at=NOW,
            )
        )
    facts = {item.record_id: item.facts for item in Outbox(store).claim("gw-a", 10, lease=60)}["ev-FOLLOWUP"]
    assert isinstance(facts, EvaluationFacts)
    assert (facts.is_follow_up, facts.parent_record_id) == (True, first)


def test_each_version_of_a_case_is_pushed_as_it_was(store: Store) -> None:
    """SPEC R4.1: every case update goes out; a version queued earlier keeps its own status."""
    evaluation = rate_call(store, "1795370600.1", level=Level.DISSATISFIED)
    box = Outbox(store)
    due = NOW + timedelta(days=1)
    with store.engine.begin() as connection:
        rating_id = connection.execute(select(ratings.c.id).where(ratings.c.record_id == evaluation)).scalar_one()
        case_id = connection.execute(
            insert(bad_rating_cases).values(
                case_no="CP2026112200017",
                rating_id=rating_id,
                status="opened",
                version=1,
                contact_due=due,
                rectify_due=due + timedelta(days=5),
                feedback_due=due + timedelta(days=15),
                created_at=NOW,
                updated_at=NOW,
            )
        ).inserted_primary_key[0]
        assert box.enqueue_case_update(connection, case_id, now=NOW) == "case-CP2026112200017-v1"
    with store.engine.begin() as connection:
        connection.execute(
            update(bad_rating_cases)
            .where(bad_rating_cases.c.id == case_id)
            .values(status="rectifying", version=2, note="已联系", updated_at=NOW + timedelta(hours=2))
        )
        assert box.enqueue_case_update(connection, case_id, now=NOW) == "case-CP2026112200017-v2"
    cases = {i.record_id: i.facts for i in box.claim("gw-a", 10, lease=60) if i.record_type == "case"}
    assert cases == {
        "case-CP2026112200017-v1": CaseFacts("CP2026112200017", 1, "opened", evaluation, NOW, due, None),
        "case-CP2026112200017-v2": CaseFacts(
            "CP2026112200017", 2, "rectifying", evaluation, NOW + timedelta(hours=2), due + timedelta(days=5), "已联系"
        ),
    }


def test_day_totals_count_by_shanghai_date_channel_and_level_as_stored_and_pushed(store: Store) -> None:
    """SPEC R7.3: the platform's day (assessTime, Asia/Shanghai), the platform's channel codes."""
    day = date(2026, 11, 22)
    just_after_midnight = datetime(2026, 11, 21, 16, 0, 30, tzinfo=UTC)  # 00:00:30 in Shanghai
    last_second = datetime(2026, 11, 22, 15, 59, 59, tzinfo=UTC)  # 23:59:59 in Shanghai
    next_day = datetime(2026, 11, 22, 16, 0, 0, tzinfo=UTC)
    day_before = datetime(2026, 11, 21, 15, 59, 59, tzinfo=UTC)
    pushed = rate_call(store, "1.1", Level.VERY_SATISFIED, just_after_midnight)
    pending = rate_call(store, "1.2", Level.VERY_SATISFIED, last_second)
    rejected = rate_call(store, "1.3", Level.DISSATISFIED, NOW)
    rate_call(store, "1.4", Level.DISSATISFIED, next_day)
    rate_call(store, "1.5", Level.DISSATISFIED, day_before)
    rate_matter(store, "M-1", level=Level.SATISFIED, rated_at=NOW)
    late = rate_matter(store, "M-2", level=Level.SATISFIED, rated_at=day_before, completed_at=NOW)
    box = Outbox(store)
    box.mark_pushed([pushed, late], "b-1")
    box.mark_rejected({rejected: "pf: bad"})
    totals = box.day_totals(day)
    assert totals.stored == {"6": {"5": 2, "2": 1}, "7": {"4": 2}}
    assert totals.pushed == {"6": {"5": 1}, "7": {"4": 1}}
    assert totals.rejected == [(rejected, "pf: bad")]
    assert pending in totals.pending and len(totals.pending) == 2
    assert (totals.stored_total, totals.pushed_total) == (5, 2)
    assert box.day_totals(date(2026, 11, 20)).stored == {}


def test_instances_claiming_at_once_never_share_a_row(store: Store) -> None:
    """SPEC R7.2 with several instances: SKIP LOCKED on PostgreSQL, one writer on SQLite."""
    with store.engine.begin() as connection:
        pk = store.find_or_create_call_record(connection, call_id="shared", linked_id=None, fields={})
        for n in range(400):
            connection.execute(
                insert(outbox).values(
                    record_id=f"ev-{n:04d}",
                    record_type="evaluation",
                    rating_id=None,
                    status="pending",
                    attempts=0,
                    next_attempt_at=NOW,
                    created_at=NOW,
                )
            )
    assert pk
    box = Outbox(store)
    taken: dict[str, list[str]] = {}

    def instance(name: str) -> None:
        mine = taken.setdefault(name, [])
        while batch := box.claim(name, 7, lease=60):
            mine.extend(item.record_id for item in batch)
            box.mark_pushed([item.record_id for item in batch], name)

    threads = [threading.Thread(target=instance, args=(f"gw-{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    everything = [record_id for mine in taken.values() for record_id in mine]
    assert sorted(everything) == [f"ev-{n:04d}" for n in range(400)]  # each once, none twice
    assert set(statuses(store).values()) == {"pushed"}


def test_the_migrations_build_exactly_the_schema_the_code_declares(store: Store) -> None:
    """Alembic's autogenerate finds nothing to add: migration 0002 matches storage/schema.py."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from storage.schema import metadata

    with store.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, metadata) == []
