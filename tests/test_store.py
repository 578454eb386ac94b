"""The evaluation store, on SQLite and on a real PostgreSQL server (same tests)."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import event, func, select, update
from sqlalchemy.exc import OperationalError

from gateway.intake import ServiceRecordInput
from gateway.privacy import mask_phone
from gateway.rating import Channel, Level, ServiceKind
from storage import migrate
from storage.schema import SERVICE_RECORD_LOOKUPS, metadata, outbox, ratings, service_records
from storage.store import Store, StoreError, make_engine

NOW = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)


def matter(record_id: str, **fields: object) -> ServiceRecordInput:
    return ServiceRecordInput(id=record_id, kind=ServiceKind.MATTER, **fields)  # type: ignore[arg-type]


def test_intake_is_idempotent_on_the_callers_id(store: Store) -> None:
    first = store.upsert_service_records([matter("M-1", matter_code="X1"), matter("M-2")])
    assert [r.status for r in first] == ["created", "created"]
    again = store.upsert_service_records([matter("M-1", matter_code="X1"), matter("M-2")])
    assert [r.status for r in again] == ["unchanged", "unchanged"]
    assert store.count_service_records() == 2


def test_completion_reported_later_updates_the_record_and_empty_fields_never_erase(store: Store) -> None:
    store.upsert_service_records([matter("M-1", matter_code="X1", agent_id="A7")])
    completed = datetime(2026, 11, 20, 9, 30, tzinfo=UTC)
    result = store.upsert_service_records([matter("M-1", completed_at=completed)])
    assert result[0].status == "updated"
    record = store.get_service_record("M-1")
    assert record is not None
    assert record["completedAt"] == completed.isoformat()
    assert record["matterCode"] == "X1" and record["agentId"] == "A7"


def test_kind_of_a_known_record_cannot_change(store: Store) -> None:
    store.upsert_service_records([matter("S-1")])
    result = store.upsert_service_records([ServiceRecordInput(id="S-1", kind=ServiceKind.CALL)])
    assert result[0].status == "rejected"
    assert "kind" in (result[0].reason or "")


def test_same_id_twice_in_one_batch_is_applied_in_order(store: Store) -> None:
    result = store.upsert_service_records([matter("D-1"), matter("D-1", matter_code="Y")])
    assert [r.status for r in result] == ["created", "updated"]
    record = store.get_service_record("D-1")
    assert record is not None and record["matterCode"] == "Y"


def test_phone_is_encrypted_at_rest_and_found_by_keyed_hash(store: Store) -> None:
    """SPEC R5.1: no clear phone number in the database; lookup by HMAC; masked view."""
    store.upsert_service_records([matter("P-1", mobile="+8613812345678")])
    with store.engine.connect() as connection:
        row = connection.execute(select(service_records)).mappings().one()
    assert b"13812345678" not in row["mobile_enc"]
    assert row["mobile_hash"] == store.protector.lookup_hash("+8613812345678")
    assert store.protector.decrypt(row["mobile_enc"]) == "+8613812345678"
    assert row["mobile_masked"] == "138****5678"
    for value in row.values():
        assert "13812345678" not in str(value)


def test_changed_phone_replaces_ciphertext_hash_and_mask(store: Store) -> None:
    store.upsert_service_records([matter("P-2", mobile="+8613812345678")])
    assert store.upsert_service_records([matter("P-2", mobile="+8613812345678")])[0].status == "unchanged"
    assert store.upsert_service_records([matter("P-2", mobile="+8613900001111")])[0].status == "updated"
    with store.engine.connect() as connection:
        row = connection.execute(select(service_records)).mappings().one()
    assert store.protector.decrypt(row["mobile_enc"]) == "+8613900001111"
    assert row["mobile_masked"] == "139****1111"


def test_one_rating_per_record_later_ones_are_attempts_and_only_the_first_is_pushed(store: Store) -> None:
    """SPEC R1.4 and R7.1: the first rating counts and enters the outbox; a second is kept for audit."""
    store.upsert_service_records([matter("R-1")])
    with store.engine.begin() as connection:
        record_pk = connection.execute(select(service_records.c.id)).scalar_one()
        first = store.add_rating(
            connection,
            service_record_id=record_pk,
            level=Level.SATISFIED,
            channel=Channel.SMS,
            raw_input="2",
            rated_at=NOW,
        )
        second = store.add_rating(
            connection,
            service_record_id=record_pk,
            level=Level.VERY_DISSATISFIED,
            channel=Channel.SMS,
            raw_input="5",
            rated_at=NOW + timedelta(minutes=1),
        )
    assert first[2] is True and second[2] is False
    with store.engine.connect() as connection:
        rows = connection.execute(select(ratings.c.level, ratings.c.is_attempt).order_by(ratings.c.id)).all()
        pushed = connection.execute(select(outbox.c.record_id)).scalars().all()
    assert rows == [(4, False), (1, True)]
    assert pushed == [first[1]]


def test_find_ratings_by_call_work_order_and_agent(store: Store) -> None:
    with store.engine.begin() as connection:
        pk = store.find_or_create_call_record(
            connection,
            call_id="1732262103.42",
            linked_id="1732262103.40",
            fields={"agent_id": "A1024", "work_order": "GD-1"},
        )
        store.add_rating(
            connection,
            service_record_id=pk,
            level=Level.VERY_SATISFIED,
            channel=Channel.VOICE,
            raw_input="1",
            rated_at=NOW,
        )
    for query in (
        {"call_id": "1732262103.42"},
        {"work_order": "GD-1"},
        {"agent_id": "A1024"},
        {"linked_id": "1732262103.40"},
        {"service_id": "1732262103.42"},
    ):
        found = store.find_ratings(**query)  # type: ignore[arg-type]
        assert [(r.level, r.channel, r.raw_input) for r in found] == [(Level.VERY_SATISFIED, "voice", "1")]
    assert store.find_ratings(agent_id="A1024", since=NOW + timedelta(seconds=1)) == []


def test_a_sqlite_writer_waits_for_the_write_lock_and_fails_as_core_reports_it(tmp_path: Path) -> None:
    """``BEGIN IMMEDIATE`` (sent on the DBAPI connection) raises Core's OperationalError when locked."""
    path = tmp_path / "gateway.sqlite3"
    engine = make_engine(f"sqlite:///{path}")
    migrate.upgrade(engine)

    @event.listens_for(engine, "connect")
    def short_wait(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute("PRAGMA busy_timeout = 50")

    engine.dispose()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(OperationalError, match="database is locked"), engine.begin() as connection:
            connection.exec_driver_sql("SELECT 1")
    finally:
        other.execute("ROLLBACK")
        other.close()
    with engine.begin() as connection:  # the lock released, the same engine writes
        connection.exec_driver_sql("UPDATE service_records SET kind = kind")
    engine.dispose()


def test_tokens_have_roles_and_only_their_hash_is_kept(store: Store) -> None:
    token = store.create_token("intake", "crm")
    assert store.authenticate(token) == ("intake", "crm")
    assert store.authenticate(token + "x") is None
    with pytest.raises(StoreError, match="role"):
        store.create_token("root", "x")


def test_a_token_can_be_listed_without_its_secret_and_revoked(store: Store) -> None:
    """SPEC R5.2: a leaked token (a supervisor's sees numbers unmasked) must be stoppable."""
    leaked = store.create_token("supervisor", "desk-7")
    kept = store.create_token("operator", "desk-8")
    listed = store.list_tokens()
    assert [(t["role"], t["name"], t["revokedAt"]) for t in listed] == [
        ("supervisor", "desk-7", None),
        ("operator", "desk-8", None),
    ]
    assert leaked not in repr(listed)
    assert store.revoke_tokens(name="desk-7") == 1
    assert store.revoke_tokens(ids=[listed[0]["id"]]) == 0  # already revoked
    assert store.authenticate(leaked) is None and store.authenticate(kept) == ("operator", "desk-8")
    assert store.list_tokens()[0]["revokedAt"] is not None


def test_upgrade_is_idempotent(store: Store) -> None:
    migrate.upgrade(store.engine)
    assert migrate.current_revision(store.engine) == migrate.head_revision(store.engine)


def test_the_migrated_schema_is_the_tables_of_storage_schema(store: Store) -> None:
    """Migrations and ``storage.schema`` describe the same tables, columns and indexes."""
    with store.engine.connect() as connection:
        context = MigrationContext.configure(connection)
        assert compare_metadata(context, metadata) == []


def test_look_up_indexes_hold_only_rows_with_a_value_and_serve_the_look_ups(store: Store) -> None:
    """Sparse indexes (migration 0004): a record writes no page to the index of a column it lacks."""
    with store.engine.connect() as connection:
        if connection.dialect.name == "sqlite":
            partial = {row[1]: row[4] for row in connection.exec_driver_sql("PRAGMA index_list(service_records)")}
        else:
            partial = {
                name: int(" WHERE " in definition)
                for name, definition in connection.exec_driver_sql(
                    "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'service_records'"
                )
            }
            connection.exec_driver_sql("SET enable_seqscan = off")  # an empty table: show what it would use
        for column in SERVICE_RECORD_LOOKUPS:
            index = f"ix_service_records_{column}"
            assert partial[index] == 1, index
            for condition, values in ((f"{column} = 'x'", ()), (f"{column} IN ('x', 'y')", ())):
                explain = "EXPLAIN QUERY PLAN" if connection.dialect.name == "sqlite" else "EXPLAIN"
                plan = " ".join(
                    str(row[-1])
                    for row in connection.exec_driver_sql(
                        f"{explain} SELECT id FROM service_records WHERE {condition}", values
                    )
                )
                assert index in plan, (condition, plan)
        assert partial["ix_service_records_updated_at"] == 0  # every record has one


def test_migration_0004_goes_down_and_up_again(store: Store) -> None:
    config = migrate.alembic_config(store.engine)
    with store.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "0003")
    assert migrate.current_revision(store.engine) == "0003"
    store.upsert_service_records([matter("M-1", matter_code="X1")])
    migrate.upgrade(store.engine)
    assert migrate.current_revision(store.engine) == migrate.head_revision(store.engine)
    assert store.get_service_record("M-1") is not None


def test_migration_0005_hides_four_digits_of_the_short_numbers_already_stored(store: Store) -> None:
    """SPEC R5.1: masks written before 0005 showed seven digits of eight; the upgrade hides more."""
    config = migrate.alembic_config(store.engine)
    with store.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "0004")
    old_masks = {"L-8": "876*4321", "L-10": "218***4321", "M-11": "138****5678", "X-12": "447*****3456"}
    store.upsert_service_records([matter(record_id) for record_id in old_masks])
    with store.engine.begin() as connection:
        for record_id, masked in old_masks.items():
            connection.execute(
                update(service_records).where(service_records.c.external_id == record_id).values(mobile_masked=masked)
            )
    migrate.upgrade(store.engine)
    assert {record_id: store.get_service_record(record_id)["mobileMasked"] for record_id in old_masks} == {  # type: ignore[index]
        "L-8": "****4321",
        "L-10": "21****4321",
        "M-11": "138****5678",
        "X-12": "447*****3456",
    }
    assert mask_phone("+8687654321") == "****4321"  # the migration's rule is the code's


def test_group_commit_of_call_ratings_matches_one_by_one_writes(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bulk path (many calls ending together) keeps SPEC R1.4 and R7.1 exactly as the single path."""
    store.upsert_service_records([ServiceRecordInput(id="WO-REPORTED", kind=ServiceKind.CALL, call_id="c-2")])

    def rating(call_id: str, key: str, linked: str | None = None) -> tuple[str, dict[str, object]]:
        level = {"1": Level.VERY_SATISFIED, "2": Level.SATISFIED, "5": Level.VERY_DISSATISFIED}[key]
        hand_off = {
            "call_id": call_id,
            "linked_id": linked,
            "agent_id": "A1",
            "work_order": None,
            "queue": None,
            "matter_code": None,
            "caller": "13800138000",
        }
        return "call_rating", {"hand_off": hand_off, "level": level, "key": key, "rated_at": NOW}

    results = store.write_together(
        [
            rating("c-1", "1"),
            rating("c-2", "2"),
            rating("c-1", "5"),
            rating("c-3", "2"),
            ("unrated_call", {"hand_off": {"call_id": "c-4"}, "reason": "timeout"}),
            rating("c-5", "1"),
        ]
    )
    assert [r[1] for r in results if isinstance(r, tuple)] == [True, True, False, True, True]
    assert results[4] is None
    assert [(r.level, r.is_attempt) for r in store.find_ratings(call_id="c-1")] == [
        (Level.VERY_SATISFIED, False),
        (Level.VERY_DISSATISFIED, True),
    ]
    assert [r.service_id for r in store.find_ratings(call_id="c-2")] == ["WO-REPORTED"]  # linked to the intake's record
    assert store.find_ratings(call_id="c-3")[0].mobile_masked == "138****8000"
    with monkeypatch.context() as patch:  # prove the bulk path itself did the work
        patch.setattr(store, "tx_call_rating", lambda *a, **k: pytest.fail("bulk path not taken"))
        again = store.write_together([rating("c-3", "5"), rating("c-6", "1")])
    assert [r[1] for r in again] == [False, True]
    with store.engine.connect() as connection:
        pushed = set(connection.execute(select(outbox.c.record_id)).scalars())
        counted = set(connection.execute(select(ratings.c.record_id).where(ratings.c.is_attempt.is_(False))).scalars())
    assert pushed == counted and len(counted) == 5


def test_calls_of_one_batch_sharing_a_known_linked_id_all_join_its_record(store: Store) -> None:
    """SPEC R1.4/R2.1: two unknown calls with the linked id of a record rate it once, in a batch as one by one."""
    store.upsert_service_records([ServiceRecordInput(id="WO-1", kind=ServiceKind.CALL, linked_id="L1")])

    def rating(call_id: str, key: str) -> tuple[str, dict[str, object]]:
        level = {"1": Level.VERY_SATISFIED, "2": Level.SATISFIED}[key]
        hand_off = {"call_id": call_id, "linked_id": "L1", "agent_id": "A1", "caller": "13800138000"}
        return "call_rating", {"hand_off": hand_off, "level": level, "key": key, "rated_at": NOW}

    results = store.write_together([rating("caller.A", "1"), rating("caller.B", "2")])
    assert [counted for _, counted in results] == [True, False]
    found = store.find_ratings(linked_id="L1")
    assert {r.service_id for r in found} == {"WO-1"}
    assert sorted((r.level, r.is_attempt) for r in found) == [(Level.SATISFIED, True), (Level.VERY_SATISFIED, False)]
    assert store.count_service_records() == 1
    with store.engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(outbox)).scalar() == 1


@pytest.mark.parametrize("bulk", [True, False])
def test_a_retried_call_rating_whose_first_try_was_committed_is_not_stored_twice(store: Store, bulk: bool) -> None:
    """A connection lost during COMMIT: the first try may be in. The retry finds it (SPEC R1.4, R7.1)."""
    hand_off = {"call_id": "c-retry", "linked_id": None, "agent_id": "A1", "caller": "13800138000"}
    rating = {"hand_off": hand_off, "level": Level.DISSATISFIED, "key": "4", "rated_at": NOW, "record_id": "ev-FIRST"}
    assert store.write_together([("call_rating", rating)]) == [("ev-FIRST", True)]
    again = [("call_rating", {**rating, "retried": True})]
    if bulk:
        again.append(("call_rating", {**rating, "hand_off": {**hand_off, "call_id": "c-other"}, "record_id": None}))
        assert store.write_together(again)[0] == ("ev-FIRST", True)
    else:
        with store.engine.begin() as connection:
            assert store.tx_call_rating(connection, **again[0][1]) == ("ev-FIRST", True)  # type: ignore[arg-type]
    assert [(r.record_id, r.is_attempt) for r in store.find_ratings(call_id="c-retry")] == [("ev-FIRST", False)]
    with store.engine.connect() as connection:
        assert list(connection.execute(select(outbox.c.record_id).where(outbox.c.record_id == "ev-FIRST"))) == [
            ("ev-FIRST",)
        ]


def test_group_commit_stores_exactly_what_the_one_by_one_path_stores(store: Store) -> None:
    """The bulk path writes with the driver's own SQL; every stored value is the one Core stores."""
    rated_at = datetime(2026, 11, 23, 10, 0, 0, 123456, tzinfo=timezone(timedelta(hours=8)))

    def hand_off(call_id: str) -> dict[str, str | None]:
        return {
            "call_id": call_id,
            "linked_id": None,
            "agent_id": "A1",
            "work_order": "WO-1",
            "queue": "q7",
            "matter_code": "M-1",
            "caller": "13800138000",
        }

    def rating(call_id: str, key: str) -> tuple[str, dict[str, object]]:
        return "call_rating", {
            "hand_off": hand_off(call_id),
            "level": Level(int(key)),
            "key": key,
            "rated_at": rated_at,
        }

    store.record_call_rating(hand_off("one"), level=Level(2), key="2", rated_at=rated_at)
    store.record_call_rating(hand_off("one"), level=Level(5), key="5", rated_at=rated_at)  # an attempt
    store.record_unrated_call(hand_off("one-unrated"), reason="timeout")
    store.write_together([rating("bulk", "2"), rating("bulk", "5")])
    store.write_together([("unrated_call", {"hand_off": hand_off("bulk-unrated"), "reason": "timeout"})])

    # Raw rows as the driver returns them: the stored form (text on SQLite), no result processing.
    with store.engine.connect() as connection:

        def raw(sql: str, call_id: str) -> list[dict[str, object]]:
            mark = "?" if connection.dialect.paramstyle == "qmark" else "%s"
            result = connection.exec_driver_sql(sql.replace("?", mark), (call_id,))
            return [dict(row._mapping) for row in result]

        records = {c: raw("SELECT * FROM service_records WHERE call_id = ?", c) for c in ("one", "bulk")}
        unrated = {
            c: raw("SELECT * FROM service_records WHERE call_id = ?", c) for c in ("one-unrated", "bulk-unrated")
        }
        rated = {
            c: raw(
                "SELECT r.* FROM ratings r JOIN service_records s ON s.id = r.service_record_id "
                "WHERE s.call_id = ? ORDER BY r.id",
                c,
            )
            for c in ("one", "bulk")
        }
        queued = {
            c: raw(
                "SELECT o.* FROM outbox o JOIN ratings r ON r.id = o.rating_id "
                "JOIN service_records s ON s.id = r.service_record_id WHERE s.call_id = ?",
                c,
            )
            for c in ("one", "bulk")
        }

    made_now = {"created_at", "updated_at", "completed_at", "next_attempt_at"}  # differ by when; same form
    ids = {"id", "external_id", "call_id", "service_record_id", "record_id", "rating_id", "mobile_enc"}

    def same(single: list[dict[str, object]], bulk: list[dict[str, object]]) -> None:
        assert len(single) == len(bulk) > 0
        for one, many in zip(single, bulk, strict=True):
            assert one.keys() == many.keys()
            for column in one:
                if column in made_now:
                    assert type(one[column]) is type(many[column]), column
                    assert len(str(one[column])) == len(str(many[column])), column
                elif column not in ids:
                    assert one[column] == many[column], column
                    assert type(one[column]) is type(many[column]), column

    same(records["one"], records["bulk"])
    same(unrated["one-unrated"], unrated["bulk-unrated"])
    same(rated["one"], rated["bulk"])
    same(queued["one"], queued["bulk"])
    assert rated["bulk"][0]["rated_at"] == rated["one"][0]["rated_at"]  # the same instant, stored alike
    assert [row["is_attempt"] for row in rated["bulk"]] == [row["is_attempt"] for row in rated["one"]]


def test_a_failed_bulk_write_is_rolled_back_and_every_write_redone_alone(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """E.g. another instance counted a rating of the same call a moment ago: nothing half-written."""

    def racing(connection: object, items: object) -> None:
        store.tx_unrated_call(connection, hand_off={"call_id": "half-written"}, reason="timeout")  # type: ignore[arg-type]
        raise RuntimeError("UNIQUE constraint failed: ratings.service_record_id, ratings.visit_id")

    monkeypatch.setattr(store, "bulk_call_rating", racing)
    hand_off = {"call_id": "c-1", "linked_id": None}
    results = store.write_together(
        [
            ("call_rating", {"hand_off": hand_off, "level": Level.SATISFIED, "key": "2", "rated_at": NOW}),
            ("unrated_call", {"hand_off": {"call_id": "c-2", "linked_id": None}, "reason": "hangup"}),
            ("rating_detail", {"record_id": "ev-unknown", "reasons": "attitude"}),
            ("call_rating", {"hand_off": hand_off, "level": Level.VERY_SATISFIED, "key": "1", "rated_at": NOW}),
        ]
    )
    assert [r[1] if isinstance(r, tuple) else r for r in results] == [True, None, None, False]
    assert store.get_service_record("half-written") is None  # the failed bulk write left nothing
    assert (store.get_service_record("c-2") or {}).get("unratedReason") == "hangup"
    assert [(r.level, r.is_attempt) for r in store.find_ratings(call_id="c-1")] == [
        (Level.SATISFIED, False),
        (Level.VERY_SATISFIED, True),
    ]


def test_group_commit_of_unrated_calls_never_marks_a_rated_call(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """SPEC R2.3/R2.4: a call with a rating is never recorded not rated, in bulk as one by one."""
    store.record_call_rating({"call_id": "c-1"}, level=Level.SATISFIED, key="2", rated_at=NOW)
    monkeypatch.setattr(store, "tx_unrated_call", lambda *a, **k: pytest.fail("bulk path not taken"))
    results = store.write_together(
        [
            ("unrated_call", {"hand_off": {"call_id": c, "linked_id": None}, "reason": reason})
            for c, reason in (("c-1", "hangup"), ("c-7", "timeout"), ("c-8", "invalid"), ("c-7", "timeout"))
        ]
    )
    assert results == [None] * 4
    assert [(c, (store.get_service_record(c) or {}).get("unratedReason")) for c in ("c-1", "c-7", "c-8")] == [
        ("c-1", None),
        ("c-7", "timeout"),
        ("c-8", "invalid"),
    ]


def test_group_commit_finds_a_call_by_its_linked_id_as_the_one_by_one_path_does(store: Store) -> None:
    """SPEC R2.1: an unknown unique id falls back to the linked id, on a call's record only, lowest id first."""
    store.upsert_service_records(
        [
            matter("M-LINKED", linked_id="L-1"),  # not a call: never taken by a linked id
            ServiceRecordInput(id="WO-FIRST", kind=ServiceKind.CALL, linked_id="L-1"),
            ServiceRecordInput(id="WO-LATER", kind=ServiceKind.CALL, linked_id="L-1"),
        ]
    )

    def rating(call_id: str, linked: str) -> tuple[str, dict[str, object]]:
        hand_off = {"call_id": call_id, "linked_id": linked}
        return "call_rating", {"hand_off": hand_off, "level": Level.SATISFIED, "key": "2", "rated_at": NOW}

    results = store.write_together([rating("c-1", "L-1"), rating("c-2", "L-2")])
    assert [r[1] for r in results] == [True, True]
    assert [r.service_id for r in store.find_ratings(linked_id="L-1")] == ["WO-FIRST"]
    assert [r.service_id for r in store.find_ratings(call_id="c-2")] == ["c-2"]  # a new record, as one by one


def test_group_commit_statements_reach_the_engine_listeners(store: Store) -> None:
    """The bulk path runs on the DBAPI cursor, yet listeners see it: the pusher wakes on outbox writes (R7.1)."""
    seen: list[str] = []

    def executed(connection: object, cursor: object, statement: str, *args: object) -> None:
        seen.append(statement)

    event.listen(store.engine, "after_cursor_execute", executed)
    try:
        hand_off = {"call_id": "c-1", "linked_id": None}
        store.write_together(
            [("call_rating", {"hand_off": hand_off, "level": Level.SATISFIED, "key": "2", "rated_at": NOW})]
        )
    finally:
        event.remove(store.engine, "after_cursor_execute", executed)
    assert any(statement.startswith("INSERT INTO outbox") for statement in seen)


def test_a_bulk_write_the_database_refuses_is_redone_one_by_one(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A driver error on the DBAPI cursor (here the one-counted-rating index) rolls back and redoes alone."""
    store.record_call_rating({"call_id": "c-1"}, level=Level.SATISFIED, key="2", rated_at=NOW)
    looked_up = store._call_records

    def missing_the_rating(*args: object, **kwargs: object) -> tuple[dict[str, int], set[int], set[int]]:
        known, created, _ = looked_up(*args, **kwargs)  # type: ignore[arg-type]
        return known, created, set()  # as if another instance counted its rating a moment ago

    monkeypatch.setattr(store, "_call_records", missing_the_rating)
    hand_off = {"call_id": "c-1", "linked_id": None}
    results = store.write_together(
        [
            ("call_rating", {"hand_off": hand_off, "level": Level.VERY_SATISFIED, "key": "1", "rated_at": NOW}),
            ("call_rating", {"hand_off": {"call_id": "c-2"}, "level": Level.SATISFIED, "key": "2", "rated_at": NOW}),
        ]
    )
    assert [r[1] for r in results] == [False, True]
    assert [(r.level, r.is_attempt) for r in store.find_ratings(call_id="c-1")] == [
        (Level.SATISFIED, False),
        (Level.VERY_SATISFIED, True),
    ]
    assert len(store.find_ratings(call_id="c-2")) == 1


def test_calls_of_one_batch_sharing_a_new_linked_id_go_to_one_record_as_one_by_one(store: Store) -> None:
    """SPEC R2.1 + R1.4: a second unknown call with the linked id the first brought joins its new
    record, whether the two are written one by one or in one group commit: one counted rating,
    one push, and a not-rated reason as the last write left it."""

    def rating(call_id: str, linked: str) -> tuple[str, dict[str, object]]:
        hand_off = {"call_id": call_id, "linked_id": linked}
        return "call_rating", {"hand_off": hand_off, "level": Level.SATISFIED, "key": "2", "rated_at": NOW}

    def unrated(call_id: str, linked: str, reason: str) -> tuple[str, dict[str, object]]:
        return "unrated_call", {"hand_off": {"call_id": call_id, "linked_id": linked}, "reason": reason}

    one_by_one = [store.write_together([write])[0] for write in (rating("a-1", "L-A"), rating("a-2", "L-A"))]
    for write in (unrated("c-1", "L-C", "timeout"), unrated("c-2", "L-C", "hangup")):
        store.write_together([write])
    together = store.write_together(
        [rating("b-1", "L-B"), rating("b-2", "L-B"), unrated("d-1", "L-D", "timeout"), unrated("d-2", "L-D", "hangup")]
    )
    assert [r[1] for r in one_by_one] == [True, False]
    assert [r[1] for r in together[:2]] == [True, False]
    for linked in ("L-A", "L-B"):
        found = store.find_ratings(linked_id=linked)
        assert len(found) == 2 and len({r.service_id for r in found}) == 1
        assert [r.is_attempt for r in found] == [False, True]
    with store.engine.connect() as connection:
        reasons = dict(
            connection.execute(
                select(service_records.c.linked_id, service_records.c.unrated_reason).where(
                    service_records.c.linked_id.in_(["L-C", "L-D"])
                )
            ).all()
        )
        pushed = connection.execute(select(outbox.c.id)).all()
    assert reasons == {"L-C": "hangup", "L-D": "hangup"}
    assert len(pushed) == 2  # one per service (a-1, b-1)
