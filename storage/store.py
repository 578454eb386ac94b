"""The shared evaluation store: every channel writes here, the pusher reads from here.

Synchronous SQLAlchemy Core on purpose: calls are short transactions that run in worker
threads (see :mod:`storage.deferred`), never on the Twisted reactor. The same code serves
SQLite (the embedded default, in WAL mode) and PostgreSQL (several gateway instances).
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import chain
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, func, insert, or_, select, text, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, IntegrityError

from gateway.config import Config
from gateway.intake import ServiceRecordInput
from gateway.privacy import DataProtector, InvalidPhoneNumber, mask_phone, normalise_phone
from gateway.rating import Channel, Level
from storage import ids
from storage.schema import (
    api_tokens,
    audit_log,
    bad_rating_cases,
    outbox,
    ratings,
    service_records,
)

ROLES = ("operator", "supervisor", "platform", "admin", "intake")

# Fields of a service record that the intake may set, besides the personal ones.
_PLAIN_FIELDS = (
    "kind",
    "completed_at",
    "matter_code",
    "matter_name",
    "department_code",
    "department_name",
    "agent_id",
    "work_order",
    "batch_id",
    "theme_id",
    "call_id",
    "linked_id",
    "queue",
    "applicant_type",
    "area_code",
)


_DERIVED = ("mobile_enc", "mobile_masked", "email_enc")
# The columns of a call's service record that differ from call to call in a bulk insert.
_NEW_CALL_RECORD = (
    "external_id",
    "call_id",
    "linked_id",
    "unrated_reason",
    "agent_id",
    "work_order",
    "queue",
    "matter_code",
    "mobile_enc",
    "mobile_hash",
    "mobile_masked",
)


class StoreError(Exception):
    """A request the store refuses, worded for the caller."""


@dataclass(frozen=True)
class IntakeResult:
    id: str
    status: str  # created | updated | unchanged | rejected
    reason: str | None = None


@dataclass(frozen=True)
class StoredRating:
    """A rating as the store returns it to operators (phone masked, SPEC R5.1)."""

    record_id: str
    level: Level
    channel: str
    raw_input: str | None
    comment: str | None
    reasons: str | None
    is_default: bool
    is_follow_up: bool
    is_attempt: bool
    rated_at: datetime
    service_id: str
    kind: str
    call_id: str | None
    linked_id: str | None
    work_order: str | None
    agent_id: str | None
    matter_code: str | None
    department_code: str | None
    mobile_masked: str | None

    def as_json(self) -> dict[str, Any]:
        return {
            "recordId": self.record_id,
            "level": int(self.level),
            "levelName": self.level.chinese_name,
            "channel": self.channel,
            "rawInput": self.raw_input,
            "comment": self.comment,
            "reasons": self.reasons.split(",") if self.reasons else [],
            "isDefault": self.is_default,
            "isFollowUp": self.is_follow_up,
            "isAttempt": self.is_attempt,
            "ratedAt": self.rated_at.isoformat(),
            "service": {
                "id": self.service_id,
                "kind": self.kind,
                "callId": self.call_id,
                "linkedId": self.linked_id,
                "workOrder": self.work_order,
                "agentId": self.agent_id,
                "matterCode": self.matter_code,
                "departmentCode": self.department_code,
                "mobileMasked": self.mobile_masked,
            },
        }


def utcnow() -> datetime:
    return datetime.now(UTC)


def make_engine(url: str, *, threads: int = 8) -> Engine:
    """An engine tuned for the store: WAL and a busy timeout on SQLite, a pool on PostgreSQL."""
    if url.startswith("sqlite"):
        database = url.split("///", 1)[1] if "///" in url else ""
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit returns only once the WAL is on disk, so a rating the caller was
            # thanked for survives a power loss too (SPEC R2.4); NORMAL would survive only a
            # crash of the process. The group commit pays one fsync per batch, not per rating
            # (measured: +0.2-0.3 ms for a one-write transaction, docs/performance.md).
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            # Multi-row INSERT ... RETURNING (the group commit) builds an ephemeral table: in
            # memory, not a temporary file created and unlinked about every other commit.
            cursor.execute("PRAGMA temp_store=MEMORY")
            cursor.close()
            # SQLAlchemy, not the sqlite3 module, decides where transactions begin: otherwise a
            # SAVEPOINT opened first starts (and its release commits) a transaction of its own.
            dbapi_connection.isolation_level = None

        @event.listens_for(engine, "begin")
        def _sqlite_begin(connection: Any) -> None:
            # IMMEDIATE: take the write lock at the start, so that a writer waits for another
            # (busy timeout) instead of failing when it upgrades a read lock. Sent on the DBAPI
            # connection: through Core's execution path it cost 27 us of the store thread per
            # transaction (half of engine.begin()'s own cost). Errors are Core's, as before.
            try:
                connection.connection.driver_connection.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as error:
                raise DBAPIError.instance("BEGIN IMMEDIATE", (), error, sqlite3.Error) from error

        return engine
    return create_engine(url, pool_size=threads, max_overflow=threads, pool_pre_ping=True)


class Store:
    """Short transactions on the evaluation store."""

    def __init__(self, engine: Engine, protector: DataProtector) -> None:
        self.engine = engine
        self.protector = protector
        self._bulk_sql: _DriverSQL | None = None

    @classmethod
    def from_config(cls, config: Config, *, upgrade: bool = True) -> Store:
        """The store a configuration names, its schema brought up to date unless told not to."""
        engine = make_engine(config.store.effective_url, threads=config.store.threads)
        if upgrade:
            from storage import migrate

            migrate.upgrade(engine)
        protector = DataProtector.from_settings(
            config.privacy.encryption_key, config.privacy.phone_hash_key, config.data_dir
        )
        return cls(engine, protector)

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    # -- health -------------------------------------------------------------------------------

    def ping(self) -> None:
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    # -- service intake (SPEC R1.3) -----------------------------------------------------------

    def upsert_service_records(self, records: Sequence[ServiceRecordInput]) -> list[IntakeResult]:
        """Create or update records by the caller's ids, idempotently.

        A known record is updated with the fields now known (an empty field never erases
        what was known); its kind cannot change. Repeating a request changes nothing.
        """
        now = utcnow()
        # An id reported twice in one call is applied in order: split into groups of unique ids.
        groups: list[dict[str, ServiceRecordInput]] = [{}]
        for record in records:
            if record.id in groups[-1]:
                groups.append({})
            groups[-1][record.id] = record
        results: list[IntakeResult] = []
        with self.engine.begin() as connection:
            for group in groups:
                results.extend(self._upsert_group(connection, group, now))
        return results

    def _upsert_group(
        self, connection: Connection, group: dict[str, ServiceRecordInput], now: datetime
    ) -> list[IntakeResult]:
        results: list[IntakeResult] = []
        existing = self._existing_records(connection, list(group))
        new_rows: list[dict[str, Any]] = []
        for record in group.values():
            row = self._row_for(record)
            known = existing.get(record.id)
            if known is None:
                new_rows.append({**row, "external_id": record.id, "created_at": now, "updated_at": now})
                results.append(IntakeResult(record.id, "created"))
                continue
            if known["kind"] != record.kind.value:
                results.append(
                    IntakeResult(record.id, "rejected", f"kind: is {known['kind']} already and cannot change")
                )
                continue
            changes = {k: v for k, v in row.items() if v is not None and k not in _DERIVED and known[k] != v}
            # Ciphertexts differ on every write: compare the lookup hashes instead.
            if "mobile_hash" in changes:
                changes.update(mobile_enc=row["mobile_enc"], mobile_masked=row["mobile_masked"])
            if "email_hash" in changes:
                changes["email_enc"] = row["email_enc"]
            if not changes:
                results.append(IntakeResult(record.id, "unchanged"))
                continue
            changes["updated_at"] = now
            connection.execute(update(service_records).where(service_records.c.id == known["id"]).values(**changes))
            results.append(IntakeResult(record.id, "updated"))
        if new_rows:
            connection.execute(insert(service_records), new_rows)
        return results

    def _existing_records(self, connection: Connection, external_ids: list[str]) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for start in range(0, len(external_ids), 500):
            chunk = external_ids[start : start + 500]
            rows = connection.execute(
                select(service_records).where(service_records.c.external_id.in_(chunk))
            ).mappings()
            found.update({row["external_id"]: row for row in rows})
        return found

    def _row_for(self, record: ServiceRecordInput) -> dict[str, Any]:
        row: dict[str, Any] = {name: getattr(record, name) for name in _PLAIN_FIELDS}
        row["kind"] = record.kind.value
        row["applicant_type"] = record.applicant_type.value if record.applicant_type else None
        row["mobile_enc"] = row["mobile_hash"] = row["mobile_masked"] = None
        row["email_enc"] = row["email_hash"] = None
        if record.mobile:
            row["mobile_enc"] = self.protector.encrypt(record.mobile)
            row["mobile_hash"] = self.protector.lookup_hash(record.mobile)
            row["mobile_masked"] = mask_phone(record.mobile)
        if record.email:
            row["email_enc"] = self.protector.encrypt(record.email)
            row["email_hash"] = self.protector.lookup_hash(record.email.lower())
        return row

    def get_service_record(self, external_id: str) -> dict[str, Any] | None:
        """One record, personal data masked (SPEC R5.1)."""
        with self.engine.connect() as connection:
            row = (
                connection.execute(select(service_records).where(service_records.c.external_id == external_id))
                .mappings()
                .first()
            )
        if row is None:
            return None
        return {
            "id": row["external_id"],
            "kind": row["kind"],
            "completedAt": row["completed_at"].isoformat() if row["completed_at"] else None,
            "mobileMasked": row["mobile_masked"],
            "hasEmail": row["email_enc"] is not None,
            **{_camel(name): row[name] for name in _PLAIN_FIELDS if name not in ("kind", "completed_at")},
            "unratedReason": row["unrated_reason"],
        }

    def count_service_records(self) -> int:
        with self.engine.connect() as connection:
            return int(connection.execute(select(func.count()).select_from(service_records)).scalar_one())

    # -- ratings (SPEC R1.4, R1.7) -------------------------------------------------------------

    def find_or_create_call_record(
        self, connection: Connection, *, call_id: str, linked_id: str | None, fields: dict[str, Any]
    ) -> int:
        """The service record of a hotline call (SPEC R1.3, R2.1), created from the hand-off if unknown.

        A call reported through the intake is found by its Asterisk unique id (``call_id`` or
        the record id), else by its linked id; otherwise the hand-off's identifiers make one.
        """
        s = service_records.c
        for condition in (s.call_id == call_id, s.external_id == call_id):
            row = connection.execute(select(s.id).where(condition).order_by(s.id).limit(1)).first()
            if row is not None:
                return int(row[0])
        if linked_id:
            row = connection.execute(
                select(s.id).where(s.linked_id == linked_id, s.kind == "call").order_by(s.id).limit(1)
            ).first()
            if row is not None:
                return int(row[0])
        now = utcnow()
        values = {
            "external_id": call_id,
            "kind": "call",
            "call_id": call_id,
            "linked_id": linked_id,
            "completed_at": now,
            "created_at": now,
            "updated_at": now,
            **{k: v for k, v in fields.items() if v},
        }
        try:
            with connection.begin_nested():
                return int(connection.execute(insert(service_records).values(**values)).inserted_primary_key[0])
        except IntegrityError:
            row = connection.execute(select(s.id).where(s.external_id == call_id)).one()
            return int(row[0])

    def _call_fields(self, hand_off: dict[str, str | None]) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "agent_id": hand_off.get("agent_id"),
            "work_order": hand_off.get("work_order"),
            "queue": hand_off.get("queue"),
            "matter_code": hand_off.get("matter_code"),
        }
        caller = hand_off.get("caller")
        if caller:
            try:
                phone = normalise_phone(caller)
            except InvalidPhoneNumber:
                phone = None
            if phone:
                fields.update(
                    mobile_enc=self.protector.encrypt(phone),
                    mobile_hash=self.protector.lookup_hash(phone),
                    mobile_masked=mask_phone(phone),
                )
        return fields

    def write_together(self, calls: Sequence[tuple[str, dict[str, Any]]]) -> list[Any]:
        """Run several ``tx_*`` writes in one transaction (group commit).

        Writes of one kind that has a ``bulk_*`` form go together in a few statements,
        wherever they stand in ``calls``: the kinds written here commute (a call's rating and
        its not-rated mark leave the call rated and unmarked in either order, SPEC R2.3; a
        rating's detail names a rating stored earlier), and within a kind the order is kept.
        Other writes run each in a savepoint, so one bad write fails alone. If a bulk write
        fails (e.g. two instances raced on one record), the whole transaction is rolled back
        and every write is redone one by one, each in its savepoint. The result list holds
        each write's result or the exception it raised, in the order of ``calls``.
        """
        try:
            with self.engine.begin() as connection:
                return self._write_all(connection, calls, bulk=True)
        except _BulkWriteFailed:
            with self.engine.begin() as connection:
                return self._write_all(connection, calls, bulk=False)

    def _write_all(self, connection: Connection, calls: Sequence[tuple[str, dict[str, Any]]], bulk: bool) -> list[Any]:
        positions: dict[str, list[int]] = {}
        for position, (name, _) in enumerate(calls):
            positions.setdefault(name, []).append(position)
        results: list[Any] = [None] * len(calls)
        for name, where in positions.items():
            group = [calls[position][1] for position in where]
            bulk_write = getattr(self, "bulk_" + name, None) if bulk else None
            if bulk_write is not None:
                try:
                    written = list(bulk_write(connection, group))
                except Exception as error:
                    raise _BulkWriteFailed from error
            else:
                written = [self._write_one(connection, name, kwargs) for kwargs in group]
            for position, result in zip(where, written, strict=True):
                results[position] = result
        return results

    def _write_one(self, connection: Connection, name: str, kwargs: dict[str, Any]) -> Any:
        try:
            with connection.begin_nested():
                return getattr(self, "tx_" + name)(connection, **kwargs)
        except Exception as error:  # reported to that caller alone
            return error

    def _driver_sql(self, connection: Connection) -> _DriverSQL:
        if self._bulk_sql is None or self._bulk_sql.dialect is not connection.dialect:
            self._bulk_sql = _DriverSQL(connection.dialect)
        return self._bulk_sql

    def _call_records(
        self,
        connection: Connection,
        hand_offs: list[dict[str, Any]],
        now: datetime,
        unrated: dict[str, str] | None = None,
    ) -> tuple[dict[str, int], set[int], set[int], set[str]]:
        """call id → service record id for many calls at once, creating the unknown ones.

        The same look-up order as :meth:`find_or_create_call_record`: Asterisk unique id,
        record id, then linked id, all read by one query. ``unrated`` gives new records their
        not-rated reason. Also returns the ids of the records created here, which have no
        rating yet, those of the records found that have a counted rating already, and the
        call ids that joined a record another call of the batch created: as one by one, an
        unknown call whose linked id an earlier call of the batch brought finds that call's
        new record (SPEC R2.1), so one service gets one counted rating (R1.4).
        """
        sql = self._driver_sql(connection)
        call_ids = sorted({hand_off.get("call_id") or "" for hand_off in hand_offs})
        linked_ids = sorted({hand_off["linked_id"] for hand_off in hand_offs if hand_off.get("linked_id")})
        # Literals, not parameters: SQLite prepares a statement again at every execution when a
        # parameter stands in a partial index's condition (uq_ratings_counted), about 30 us.
        no = sql.literal(ratings.c.is_attempt, False)
        marks = sql.marks(len(call_ids))
        where = f"call_id IN ({marks}) OR external_id IN ({marks})"
        if linked_ids:
            where += f" OR linked_id IN ({sql.marks(len(linked_ids))})"
        rows = sql.rows(
            connection,
            "SELECT id, call_id, external_id, linked_id, kind, EXISTS (SELECT 1 FROM ratings "
            f"WHERE ratings.service_record_id = service_records.id AND ratings.is_attempt = {no} "
            f"AND ratings.is_follow_up = {no} AND ratings.visit_id = '') "
            f"FROM service_records WHERE {where} ORDER BY id",
            [*call_ids, *call_ids, *linked_ids],
        )
        wanted = set(call_ids)
        known: dict[str, int] = {}
        by_record_id: dict[str, int] = {}
        rated: set[int] = set()
        for pk, call_id, external_id, _, _, counted in rows:
            if call_id in wanted:
                known.setdefault(call_id, pk)
            if external_id in wanted:
                by_record_id.setdefault(external_id, pk)
            if counted:
                rated.add(pk)
        for call_id, pk in by_record_id.items():
            known.setdefault(call_id, pk)
        linked: dict[str, list[str]] = {}  # linked id → every unknown call of the batch that has it
        for hand_off in hand_offs:
            call_id = hand_off.get("call_id") or ""
            if call_id not in known and hand_off.get("linked_id"):
                linked.setdefault(hand_off["linked_id"], []).append(call_id)
        if linked:
            for pk, _, _, linked_id, kind, _ in rows:
                if kind == "call" and linked_id in linked:
                    for call_id in linked[linked_id]:
                        known.setdefault(call_id, pk)
        new_records: dict[str, tuple[Any, ...]] = {}
        bringer: dict[str, str] = {}  # linked id → the call id whose new record carries it
        joined: dict[str, str] = {}  # call id → the call id whose new record it joins
        for hand_off in hand_offs:
            call_id = hand_off.get("call_id") or ""
            linked_id = hand_off.get("linked_id")
            if call_id in known or call_id in new_records or call_id in joined:
                continue
            if linked_id and linked_id in bringer:
                joined[call_id] = bringer[linked_id]
                continue
            if linked_id:
                bringer[linked_id] = call_id
            fields = self._call_fields(hand_off)
            new_records[call_id] = (
                call_id,
                call_id,
                hand_off.get("linked_id"),
                (unrated or {}).get(call_id),
                fields["agent_id"] or None,
                fields["work_order"] or None,
                fields["queue"] or None,
                fields["matter_code"] or None,
                fields.get("mobile_enc") or None,
                fields.get("mobile_hash") or None,
                fields.get("mobile_masked") or None,
            )
        created: set[int] = set()
        if new_records:
            for pk, external_id in sql.insert(
                connection,
                service_records,
                _NEW_CALL_RECORD,
                list(new_records.values()),
                same={"kind": "call", "completed_at": now, "created_at": now, "updated_at": now},
                returning=("id", "external_id"),
            ):
                known[external_id] = pk
                created.add(pk)
        for call_id, first in joined.items():
            known[call_id] = known[first]
        return known, created, rated, set(joined)

    def bulk_unrated_call(self, connection: Connection, items: list[dict[str, Any]]) -> list[None]:
        """Many calls that ended not rated (SPEC R2.3), as :meth:`tx_unrated_call` does for one."""
        sql = self._driver_sql(connection)
        now = utcnow()
        reasons = {(item["hand_off"].get("call_id") or ""): item["reason"] for item in items}
        hand_offs = [item["hand_off"] for item in items]
        known, created, _, joined = self._call_records(connection, hand_offs, now, unrated=reasons)
        by_reason: dict[str, list[int]] = {}
        for call_id, reason in reasons.items():
            if known[call_id] not in created or call_id in joined:  # a new record got its reason when created
                by_reason.setdefault(reason, []).append(known[call_id])
        for reason, pks in by_reason.items():
            sql.execute(
                connection,
                f"UPDATE service_records SET unrated_reason = {sql.mark}, updated_at = {sql.mark} "
                f"WHERE id IN ({sql.marks(len(pks))}) AND NOT EXISTS "
                "(SELECT ratings.id FROM ratings WHERE ratings.service_record_id = service_records.id)",
                [reason, sql.value(service_records.c.updated_at, now), *pks],
            )
        return [None] * len(items)

    def bulk_call_rating(self, connection: Connection, items: list[dict[str, Any]]) -> list[tuple[str, bool]]:
        """Many hotline ratings in a handful of statements: what :meth:`tx_call_rating` does for one.

        Raises on any conflict (e.g. another instance counted a rating of the same call a
        moment ago); :meth:`write_together` then redoes the writes one by one.
        """
        sql = self._driver_sql(connection)
        now = utcnow()
        retried = [item["record_id"] for item in items if item.get("retried") and item.get("record_id")]
        earlier = self._ratings_stored(connection, retried) if retried else {}
        known, created, rated, _ = self._call_records(connection, [item["hand_off"] for item in items], now)
        # Only records that existed before may have a not-rated mark already.
        existing = sorted({known[item["hand_off"].get("call_id") or ""] for item in items} - created)
        rating_rows: list[tuple[Any, ...]] = []
        results: list[tuple[str, bool]] = []
        for item in items:
            if item.get("record_id") in earlier:  # a retry whose first try was committed after all
                results.append((item["record_id"], earlier[item["record_id"]]))
                continue
            pk = known[item["hand_off"].get("call_id") or ""]
            counted = pk not in rated
            rated.add(pk)
            record_id = item.get("record_id") or ids.new_id("ev")
            rating_rows.append((record_id, pk, int(item["level"]), item["key"], not counted, item["rated_at"]))
            results.append((record_id, counted))
        if not rating_rows:
            return results
        inserted = sql.insert(
            connection,
            ratings,
            ("record_id", "service_record_id", "level", "raw_input", "is_attempt", "rated_at"),
            rating_rows,
            same={
                "channel": Channel.VOICE.value,
                "comment": None,
                "reasons": None,
                "is_default": False,
                "created_at": now,
            },
            returning=("id", "record_id"),
        )
        rating_pks = {record_id: pk for pk, record_id in inserted}
        outbox_rows = [
            (record_id, rating_pks[record_id], item.get("push_after") or now)
            for item, (record_id, counted) in zip(items, results, strict=True)
            if counted and record_id in rating_pks
        ]
        if outbox_rows:
            sql.insert(
                connection,
                outbox,
                ("record_id", "rating_id", "next_attempt_at"),
                outbox_rows,
                same={"record_type": "evaluation", "status": "pending", "attempts": 0, "created_at": now},
            )
        if existing:
            sql.execute(
                connection,
                f"UPDATE service_records SET unrated_reason = NULL, updated_at = {sql.mark} "
                f"WHERE id IN ({sql.marks(len(existing))}) AND unrated_reason IS NOT NULL",
                [sql.value(service_records.c.updated_at, now), *existing],
            )
        return results

    def record_call_rating(
        self, hand_off: dict[str, str | None], *, level: Level, key: str, rated_at: datetime
    ) -> tuple[str, bool]:
        with self.engine.begin() as connection:
            return self.tx_call_rating(connection, hand_off=hand_off, level=level, key=key, rated_at=rated_at)

    def tx_call_rating(
        self,
        connection: Connection,
        *,
        hand_off: dict[str, str | None],
        level: Level,
        key: str,
        rated_at: datetime,
        push_after: datetime | None = None,
        record_id: str | None = None,
        retried: bool = False,
    ) -> tuple[str, bool]:
        """Store a hotline caller's key as a rating (SPEC R2.2, R2.4): (record id, counted).

        ``hand_off`` holds the call's identifiers (SPEC R2.1): call_id, linked_id, agent_id,
        work_order, queue, matter_code, caller. Record, rating and outbox row together.
        ``push_after`` holds the push back while the caller may still give the reasons of a bad
        rating (SPEC R2.5); :meth:`tx_release_push` lets it go when the call ends.
        ``record_id``, chosen by the caller, makes a ``retried`` write idempotent: if the first
        try was committed after all (a connection lost during COMMIT), its rating is the answer.
        """
        if retried and record_id:
            earlier = self._ratings_stored(connection, [record_id])
            if record_id in earlier:
                return record_id, earlier[record_id]
        call_id = hand_off.get("call_id") or ""
        pk = self.find_or_create_call_record(
            connection, call_id=call_id, linked_id=hand_off.get("linked_id"), fields=self._call_fields(hand_off)
        )
        _, record_id, counted = self.add_rating(
            connection,
            service_record_id=pk,
            level=level,
            channel=Channel.VOICE,
            raw_input=key,
            rated_at=rated_at,
            push_after=push_after,
            record_id=record_id,
        )
        connection.execute(update(service_records).where(service_records.c.id == pk).values(unrated_reason=None))
        return record_id, counted

    def _ratings_stored(self, connection: Connection, record_ids: list[str]) -> dict[str, bool]:
        """record id → counted, of the ratings among ``record_ids`` that are stored already."""
        found: dict[str, bool] = {}
        for start in range(0, len(record_ids), 500):
            chunk = record_ids[start : start + 500]
            for record_id, is_attempt in connection.execute(
                select(ratings.c.record_id, ratings.c.is_attempt).where(ratings.c.record_id.in_(chunk))
            ):
                found[record_id] = not is_attempt
        return found

    def tx_release_push(self, connection: Connection, *, record_id: str) -> None:
        """The rating is complete (its details stored): push it now (SPEC R2.5, R7.1)."""
        connection.execute(
            update(outbox)
            .where(outbox.c.record_id == record_id, outbox.c.status == "pending")
            .values(next_attempt_at=utcnow())
        )

    def record_rating_detail(
        self, record_id: str, *, reasons: str | None = None, comment_ref: str | None = None
    ) -> None:
        with self.engine.begin() as connection:
            self.tx_rating_detail(connection, record_id=record_id, reasons=reasons, comment_ref=comment_ref)

    def tx_rating_detail(
        self, connection: Connection, *, record_id: str, reasons: str | None = None, comment_ref: str | None = None
    ) -> None:
        """Bad-rating reasons and a voice comment's reference (SPEC R2.5), after the rating."""
        values: dict[str, Any] = {}
        if reasons is not None:
            values["reasons"] = reasons
        if comment_ref is not None:
            values["voice_comment_ref"] = comment_ref
        if values:
            connection.execute(update(ratings).where(ratings.c.record_id == record_id).values(**values))

    def record_unrated_call(self, hand_off: dict[str, str | None], *, reason: str) -> None:
        with self.engine.begin() as connection:
            self.tx_unrated_call(connection, hand_off=hand_off, reason=reason)

    def tx_unrated_call(self, connection: Connection, *, hand_off: dict[str, str | None], reason: str) -> None:
        """A call that ended without a rating (SPEC R2.3), ready for an SMS invitation (R3.1)."""
        call_id = hand_off.get("call_id") or ""
        pk = self.find_or_create_call_record(
            connection, call_id=call_id, linked_id=hand_off.get("linked_id"), fields=self._call_fields(hand_off)
        )
        rated = connection.execute(select(ratings.c.id).where(ratings.c.service_record_id == pk).limit(1)).first()
        if rated is None:
            connection.execute(
                update(service_records)
                .where(service_records.c.id == pk)
                .values(unrated_reason=reason, updated_at=utcnow())
            )

    def add_rating(
        self,
        connection: Connection,
        *,
        service_record_id: int,
        level: Level,
        channel: Channel,
        raw_input: str | None,
        rated_at: datetime,
        comment: str | None = None,
        reasons: str | None = None,
        is_default: bool = False,
        push_after: datetime | None = None,
        record_id: str | None = None,
        overall: bool = False,
    ) -> tuple[int, str, bool]:
        """Insert a rating; the first counts, later ones are kept as attempts (SPEC R1.4).

        Every counted rating goes to the outbox in the same transaction (SPEC R7.1), so a
        stored rating is a rating that will be pushed. ``overall`` marks a theme's overall
        rating (SPEC R1.6), stored on one of its matters. Returns (row id, record id, counted).
        """
        record_id = record_id or ids.new_id("ev")
        values = {
            "record_id": record_id,
            "service_record_id": service_record_id,
            "level": int(level),
            "channel": channel.value,
            "raw_input": raw_input,
            "comment": comment,
            "reasons": reasons,
            "is_default": is_default,
            "overall": overall,
            "rated_at": rated_at,
            "created_at": utcnow(),
        }
        try:
            with connection.begin_nested():
                rating_id = int(connection.execute(insert(ratings).values(**values)).inserted_primary_key[0])
            counted = True
        except IntegrityError:
            rating_id = int(
                connection.execute(insert(ratings).values(**values, is_attempt=True)).inserted_primary_key[0]
            )
            counted = False
        if counted:
            connection.execute(
                insert(outbox).values(
                    record_id=record_id,
                    record_type="evaluation",
                    rating_id=rating_id,
                    status="pending",
                    attempts=0,
                    next_attempt_at=push_after or values["created_at"],
                    created_at=values["created_at"],
                )
            )
        return rating_id, record_id, counted

    def find_ratings(
        self,
        *,
        call_id: str | None = None,
        linked_id: str | None = None,
        work_order: str | None = None,
        agent_id: str | None = None,
        service_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[StoredRating]:
        """Ratings linked to a call, work order, agent or service record (operators' view).

        One page of :func:`storage.queries.find_ratings_page`, the look-up the API uses too.
        """
        from storage.queries import find_ratings_page  # it builds on this module

        filters = {
            name: value
            for name, value in (
                ("call_id", call_id),
                ("linked_id", linked_id),
                ("work_order", work_order),
                ("agent", agent_id),
                ("service_id", service_id),
            )
            if value is not None
        }
        return list(find_ratings_page(self, filters, since=since, until=until, limit=limit, offset=offset).items)

    # -- API tokens (SPEC R5.2) ----------------------------------------------------------------

    def create_token(self, role: str, name: str) -> str:
        """A new bearer token; only its hash is kept, so it is shown once."""
        if role not in ROLES:
            raise StoreError(f"role {role!r} is not one of {', '.join(ROLES)}")
        token = "hcp_" + secrets.token_urlsafe(32)
        with self.engine.begin() as connection:
            connection.execute(
                insert(api_tokens).values(token_hash=_token_hash(token), role=role, name=name, created_at=utcnow())
            )
            self._audit(connection, "cli", "token.create", name, {"role": role})
        return token

    def list_tokens(self) -> list[dict[str, Any]]:
        """Every token's id, role, name and dates; never the token (only its hash is kept)."""
        t = api_tokens.c
        with self.engine.connect() as connection:
            rows = connection.execute(select(t.id, t.role, t.name, t.created_at, t.revoked_at).order_by(t.id))
            return [
                {
                    "id": row.id,
                    "role": row.role,
                    "name": row.name,
                    "createdAt": row.created_at.isoformat(),
                    "revokedAt": row.revoked_at.isoformat() if row.revoked_at else None,
                }
                for row in rows
            ]

    def revoke_tokens(self, *, ids: Sequence[int] = (), name: str | None = None) -> int:
        """Revoke the tokens with these ids, or every token with this name; returns how many."""
        t = api_tokens.c
        chosen = [t.id.in_(list(ids))] if ids else []
        if name is not None:
            chosen.append(t.name == name)
        if not chosen:
            return 0
        with self.engine.begin() as connection:
            revoked = connection.execute(
                update(api_tokens).where(or_(*chosen), t.revoked_at.is_(None)).values(revoked_at=utcnow())
            ).rowcount
            self._audit(connection, "cli", "token.revoke", name, {"ids": list(ids), "revoked": revoked})
        return revoked

    def authenticate(self, token: str) -> tuple[str, str] | None:
        """(role, token name) for a valid bearer token, else None."""
        with self.engine.connect() as connection:
            row = connection.execute(
                select(api_tokens.c.role, api_tokens.c.name).where(
                    api_tokens.c.token_hash == _token_hash(token), api_tokens.c.revoked_at.is_(None)
                )
            ).first()
        return (row[0], row[1]) if row else None

    # -- audit (SPEC R5.1) ---------------------------------------------------------------------

    def audit(self, actor: str, action: str, subject: str | None, detail: dict[str, Any] | None = None) -> None:
        with self.engine.begin() as connection:
            self._audit(connection, actor, action, subject, detail)

    def _audit(
        self, connection: Connection, actor: str, action: str, subject: str | None, detail: dict[str, Any] | None
    ) -> None:
        connection.execute(
            insert(audit_log).values(at=utcnow(), actor=actor, action=action, subject=subject, detail=detail)
        )

    def table_counts(
        self, tables: Iterable[str] = ("service_records", "ratings", "outbox", "bad_rating_cases")
    ) -> dict[str, int]:
        known = {t.name: t for t in (service_records, ratings, outbox, bad_rating_cases)}
        with self.engine.connect() as connection:
            return {
                name: int(connection.execute(select(func.count()).select_from(known[name])).scalar_one())
                for name in tables
            }


class _BulkWriteFailed(Exception):
    """A bulk write of a group commit failed: redo the group one write at a time."""


class _DriverSQL:
    """The group commit's statements as the driver's own SQL, values converted as Core would.

    Core builds, caches and compiles each statement, converts each value and wraps each
    cursor in a result on every execute (about 0.1 ms per statement: most of a small group
    commit's CPU, in the thread that shares the GIL with the calls). The few statements of
    the bulk paths run hundreds of times a second, so their text is written here once and
    they run on the DBAPI cursor of the transaction's own connection. Every value goes
    through its column type's own bind processor for the dialect, the very function Core
    would call (``UTCDateTime`` to naive UTC, then SQLite's text form; booleans to 0/1 on
    SQLite), once per statement for a value every row shares: the rows stored are the same
    as Core's on SQLite and PostgreSQL (``tests/test_store.py`` compares them). Columns left
    out of a row get their scalar Python-side default, as Core fills them in. The engine's
    ``before/after_cursor_execute`` listeners still see each statement (the pusher wakes on
    ``INSERT INTO outbox``), with no execution context.
    """

    #: Bound values in one statement: below SQLite's 32,766 and PostgreSQL's 65,535.
    MAX_PARAMS = 30_000

    def __init__(self, dialect: Any) -> None:
        self.dialect = dialect
        self.mark = "?" if dialect.paramstyle == "qmark" else "%s"
        self._processors: dict[Any, Any] = {}
        self._literals: dict[tuple[Any, Any], str] = {}
        self._plans: dict[tuple[str, tuple[str, ...], tuple[str, ...]], _InsertPlan] = {}

    def marks(self, count: int) -> str:
        return ", ".join([self.mark] * count)

    def processor(self, column: Any) -> Any:
        try:
            return self._processors[column]
        except KeyError:
            process = column.type.dialect_impl(self.dialect).bind_processor(self.dialect)
            self._processors[column] = process
            return process

    def value(self, column: Any, value: Any) -> Any:
        """``value`` as Core would bind it to ``column``."""
        process = self.processor(column)
        return value if process is None or value is None else process(value)

    def literal(self, column: Any, value: Any) -> str:
        """``value`` written into SQL text for ``column``, as Core renders a literal."""
        key = (column, value)
        if key not in self._literals:
            render = column.type.dialect_impl(self.dialect).literal_processor(self.dialect)
            self._literals[key] = str(render(value))
        return self._literals[key]

    def rows(self, connection: Connection, statement: str, params: Sequence[Any]) -> list[Any]:
        return self._run(connection, statement, tuple(params), fetch=True)

    def execute(self, connection: Connection, statement: str, params: Sequence[Any]) -> None:
        self._run(connection, statement, tuple(params))

    def _run(
        self, connection: Connection, statement: str, params: Any, *, many: bool = False, fetch: bool = False
    ) -> Any:
        dispatch = connection.dispatch
        cursor = connection.connection.cursor()
        try:
            if dispatch.before_cursor_execute:
                for listener in dispatch.before_cursor_execute:
                    statement, params = listener(connection, cursor, statement, params, None, many)
            if many:
                cursor.executemany(statement, params)
            else:
                cursor.execute(statement, params)
            rows = cursor.fetchall() if fetch else None
            if dispatch.after_cursor_execute:
                dispatch.after_cursor_execute(connection, cursor, statement, params, None, many)
            return rows
        except self.dialect.loaded_dbapi.Error as error:
            # As Core does: a connection lost is not given back to the pool, so the redo gets a live one.
            if self.dialect.is_disconnect(error, connection.connection.dbapi_connection, cursor):
                connection.invalidate(error)
            raise
        finally:
            cursor.close()

    def _plan(self, table: Any, names: tuple[str, ...], same: tuple[str, ...]) -> _InsertPlan:
        key = (table.name, names, same)
        plan = self._plans.get(key)
        if plan is None:
            given = (*names, *same)
            defaults = [
                column
                for column in table.c
                if column.name not in given and column.default is not None and column.default.is_scalar
            ]
            columns = [*given, *(column.name for column in defaults)]
            per_row = [(index, self.processor(table.c[name])) for index, name in enumerate(names)]
            plan = _InsertPlan(
                f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ",
                f"({self.marks(len(columns))})",
                [(index, process) for index, process in per_row if process is not None],
                [self.processor(table.c[name]) for name in same],
                tuple(self.value(column, column.default.arg) for column in defaults),
            )
            self._plans[key] = plan
        return plan

    def insert(
        self,
        connection: Connection,
        table: Any,
        names: tuple[str, ...],
        rows: list[tuple[Any, ...]],
        *,
        same: dict[str, Any] | None = None,
        returning: tuple[str, ...] = (),
    ) -> list[Any]:
        """Insert ``rows`` (values of the columns ``names``, in that order), each with the values in ``same``.

        A value in ``same``, or one a row repeats from the row before (the batch's ``now``), is
        converted once. With ``returning``, those columns of each new row.
        """
        same = same or {}
        plan = self._plan(table, names, tuple(same))
        shared = [
            value if process is None or value is None else process(value)
            for process, value in zip(plan.same, same.values(), strict=True)
        ]
        shared.extend(plan.defaults)
        values = [[*row, *shared] for row in rows]
        for index, process in plan.convert:
            last = bound = None
            for row in values:
                value = row[index]
                if value is not None:
                    if value is not last:
                        last, bound = value, process(value)
                    row[index] = bound
        if not returning:
            self._run(connection, plan.sql + plan.one_row, values, many=True)
            return []
        returned: list[Any] = []
        step = max(1, self.MAX_PARAMS // len(values[0]))
        for start in range(0, len(values), step):
            chunk = values[start : start + step]
            statement = plan.sql + ", ".join([plan.one_row] * len(chunk)) + f" RETURNING {', '.join(returning)}"
            returned.extend(self._run(connection, statement, tuple(chain.from_iterable(chunk)), fetch=True))
        return returned


@dataclass(frozen=True)
class _InsertPlan:
    """An insert's text up to VALUES, one row's marks, and how each value gets to the driver's form."""

    sql: str
    one_row: str
    convert: list[tuple[int, Any]]  # (position in a row, bind processor) of the columns that have one
    same: list[Any]  # the bind processor (or None) of each column given once for all rows
    defaults: tuple[Any, ...]  # the Python-side defaults of the columns not given, in driver form


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)
