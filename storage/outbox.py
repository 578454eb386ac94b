"""The outbox seen from the pusher: claim, settle, count, reconcile (SPEC R7.1-R7.3).

Every counted rating (and every bad-rating case update) has an outbox row, written in the
same transaction as the rating (see :meth:`storage.store.Store.add_rating`). A pusher leases
due rows (``claimed_by`` / ``claimed_until``) so that several instances sharing a PostgreSQL
store never push the same record at once: ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, one
``UPDATE … RETURNING`` on SQLite (a single writer). A crashed instance's lease simply expires.
Synchronous, like the store: the pusher calls these in store threads.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import func, insert, or_, select, update
from sqlalchemy.engine import Connection

from gateway.platform.records import (
    SHANGHAI,
    CaseFacts,
    EvaluationFacts,
    assess_moment,
    case_deadline_field,
    case_record_id,
    pf_code,
)
from gateway.rating import RatedItem
from storage.schema import bad_rating_cases, invitations, outbox, ratings, service_records
from storage.store import Store, utcnow

PENDING, PUSHED, REJECTED = "pending", "pushed", "rejected"
#: Rows per ``IN (…)`` list: well under SQLite's and PostgreSQL's parameter limits.
_CHUNK = 500
_SERVICE_FIELDS = (
    "kind",
    "completed_at",
    "matter_code",
    "matter_name",
    "department_code",
    "department_name",
    "area_code",
    "agent_id",
    "work_order",
    "call_id",
    "linked_id",
    "applicant_type",
    "mobile_masked",
    "mobile_hash",
    "batch_id",
    "theme_id",
)


@dataclass(frozen=True)
class OutboxItem:
    """A claimed outbox row with the facts to build its platform record from."""

    outbox_id: int
    record_id: str
    record_type: str  # evaluation | case
    attempts: int
    facts: EvaluationFacts | CaseFacts | None  # None: its rating or case no longer exists


@dataclass
class DayTotals:
    """One day's ratings (by assessTime, Asia/Shanghai) per pf channel code and level (SPEC R7.3)."""

    day: date
    stored: dict[str, dict[str, int]] = field(default_factory=dict)
    pushed: dict[str, dict[str, int]] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (recordId, the platform's reason)

    @property
    def stored_total(self) -> int:
        return sum(n for levels in self.stored.values() for n in levels.values())

    @property
    def pushed_total(self) -> int:
        return sum(n for levels in self.pushed.values() for n in levels.values())


class Outbox:
    """The pusher's queries on one :class:`Store`."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # -- claiming ------------------------------------------------------------------------------

    def claim(self, owner: str, limit: int, *, lease: float, now: datetime | None = None) -> list[OutboxItem]:
        """Lease up to ``limit`` due rows to ``owner`` for ``lease`` seconds, oldest first.

        A row is due when it is pending, its ``next_attempt_at`` has come, and nobody holds a
        live lease on it. Returns the rows with their facts, in outbox order.
        """
        now = now or utcnow()
        o = outbox.c
        due = (
            select(o.id)
            .where(
                o.status == PENDING,
                o.next_attempt_at <= now,
                or_(o.claimed_until.is_(None), o.claimed_until <= now),
            )
            .order_by(o.id)
            .limit(limit)
        )
        if not self.store.is_sqlite:
            due = due.with_for_update(skip_locked=True)
        claim = (
            update(outbox)
            .where(o.id.in_(due.scalar_subquery()))
            .values(claimed_by=owner, claimed_until=now + timedelta(seconds=lease))
            .returning(o.id, o.record_id, o.record_type, o.rating_id, o.case_id, o.attempts, o.payload)
        )
        with self.store.engine.begin() as connection:
            rows = sorted(connection.execute(claim).mappings().all(), key=lambda row: row["id"])
            if not rows:
                return []
            evaluations = _evaluation_facts(connection, [row["rating_id"] for row in rows if row["rating_id"]])
            cases = _case_facts(connection, [row["case_id"] for row in rows if row["case_id"]])
        items = []
        for row in rows:
            facts: EvaluationFacts | CaseFacts | None
            if row["record_type"] == "case":
                facts = _case_from_payload(row["payload"]) if row["payload"] else cases.get(row["case_id"])
            else:
                facts = evaluations.get(row["rating_id"])
            items.append(OutboxItem(row["id"], row["record_id"], row["record_type"], row["attempts"], facts))
        return items

    # -- settling ------------------------------------------------------------------------------

    def mark_pushed(self, record_ids: Sequence[str], batch_id: str, *, now: datetime | None = None) -> int:
        """The platform acknowledged these (accepted or duplicate): done for good (SPEC R7.2)."""
        now = now or utcnow()
        values = {
            "status": PUSHED,
            "pushed_at": now,
            "pushed_batch_id": batch_id,
            "claimed_by": None,
            "claimed_until": None,
            "last_error": None,
        }
        return self._update_many(record_ids, values, only_pending=True)

    def mark_rejected(self, reasons: Mapping[str, str], *, now: datetime | None = None) -> int:
        """The platform refused these as invalid: set aside with its reason, never retried unchanged."""
        changed = 0
        with self.store.engine.begin() as connection:
            for record_id, reason in reasons.items():
                changed += connection.execute(
                    update(outbox)
                    .where(outbox.c.record_id == record_id, outbox.c.status == PENDING)
                    .values(
                        status=REJECTED,
                        rejected_reason=reason[:2000],
                        last_error=None,
                        claimed_by=None,
                        claimed_until=None,
                        attempts=outbox.c.attempts + 1,
                    )
                ).rowcount
        return changed

    def release(
        self,
        owner: str,
        record_ids: Sequence[str],
        *,
        error: str | None = None,
        retry_at: datetime | None = None,
        count_attempt: bool = True,
    ) -> int:
        """Give back ``owner``'s lease on rows not acknowledged, to be pushed again.

        ``retry_at`` delays the rows (e.g. the platform's Retry-After), else they are due at once:
        the pusher backs off as a whole, so a long outage never leaves rows waiting on their own
        long timers when the platform returns.
        """
        values: dict[str, Any] = {"claimed_by": None, "claimed_until": None}
        if error is not None:
            values["last_error"] = error[:2000]
        if retry_at is not None:
            values["next_attempt_at"] = retry_at
        if count_attempt:
            values["attempts"] = outbox.c.attempts + 1
        return self._update_many(record_ids, values, only_pending=True, owner=owner)

    def renew(self, owner: str, record_ids: Sequence[str], *, lease: float, now: datetime | None = None) -> set[str]:
        """Extend ``owner``'s lease; returns the records it still holds (a lapsed lease may be lost)."""
        now = now or utcnow()
        held: set[str] = set()
        with self.store.engine.begin() as connection:
            for chunk in _chunks(record_ids):
                query = (
                    update(outbox)
                    .where(outbox.c.record_id.in_(chunk), outbox.c.claimed_by == owner, outbox.c.status == PENDING)
                    .values(claimed_until=now + timedelta(seconds=lease))
                    .returning(outbox.c.record_id)
                )
                held.update(connection.execute(query).scalars())
        return held

    def _update_many(
        self, record_ids: Sequence[str], values: dict[str, Any], *, only_pending: bool, owner: str | None = None
    ) -> int:
        changed = 0
        with self.store.engine.begin() as connection:
            for start in range(0, len(record_ids), _CHUNK):
                conditions = [outbox.c.record_id.in_(list(record_ids[start : start + _CHUNK]))]
                if only_pending:
                    conditions.append(outbox.c.status == PENDING)
                if owner is not None:
                    conditions.append(outbox.c.claimed_by == owner)
                changed += connection.execute(update(outbox).where(*conditions).values(**values)).rowcount
        return changed

    # -- queueing case updates (SPEC R4.1) -----------------------------------------------------

    def enqueue_case_update(self, connection: Connection, case_id: int, *, now: datetime | None = None) -> str:
        """Queue the case's current version for the platform, in the caller's transaction.

        The version is kept as a snapshot, so that it is pushed as it was even if the case moves
        on before the push. Returns the record id (``case-<caseNo>-v<version>``).
        """
        now = now or utcnow()
        facts = _case_facts(connection, [case_id])[case_id]
        record_id = case_record_id(facts.case_no, facts.version)
        connection.execute(
            insert(outbox).values(
                record_id=record_id,
                record_type="case",
                case_id=case_id,
                status=PENDING,
                attempts=0,
                next_attempt_at=now,
                created_at=now,
                payload=_case_to_payload(facts),
            )
        )
        return record_id

    # -- reporting -----------------------------------------------------------------------------

    def status_counts(self) -> dict[str, int]:
        """Rows per status: pending, pushed, rejected (and how many pending are leased now)."""
        counts = {PENDING: 0, PUSHED: 0, REJECTED: 0}
        now = utcnow()
        with self.store.engine.connect() as connection:
            for status, n in connection.execute(select(outbox.c.status, func.count()).group_by(outbox.c.status)):
                counts[status] = int(n)
            counts["claimed"] = int(
                connection.execute(
                    select(func.count()).where(outbox.c.status == PENDING, outbox.c.claimed_until > now)
                ).scalar_one()
            )
        return counts

    def oldest_pending_at(self) -> datetime | None:
        with self.store.engine.connect() as connection:
            return connection.execute(
                select(func.min(outbox.c.created_at)).where(outbox.c.status == PENDING)
            ).scalar_one()

    def pending_ids(self, limit: int = 1000) -> list[str]:
        with self.store.engine.connect() as connection:
            query = select(outbox.c.record_id).where(outbox.c.status == PENDING).order_by(outbox.c.id).limit(limit)
            return list(connection.execute(query).scalars())

    def rejected(self, limit: int = 1000) -> list[tuple[str, str]]:
        """Records set aside: (recordId, the platform's reason), for the report (SPEC R7.2)."""
        with self.store.engine.connect() as connection:
            query = (
                select(outbox.c.record_id, outbox.c.rejected_reason)
                .where(outbox.c.status == REJECTED)
                .order_by(outbox.c.id)
                .limit(limit)
            )
            return [(row[0], row[1] or "") for row in connection.execute(query)]

    def day_totals(self, day: date) -> DayTotals:
        """Counted ratings of ``day`` per channel code and level, as stored and as pushed (SPEC R7.3).

        The day is the platform's: the assessTime date in Asia/Shanghai, with the same pf code
        and assessTime rules as the records pushed (:mod:`gateway.platform.records`), so both
        sides count the same way. A rating's assessTime is never more than a day after it was
        given, so the ratings of the day before are read too.
        """
        start = datetime.combine(day, time(), SHANGHAI).astimezone(UTC)
        end = start + timedelta(days=1)
        r, s, o = ratings.c, service_records.c, outbox.c
        query = (
            select(
                r.id,
                r.level,
                r.channel,
                r.is_default,
                r.rated_at,
                r.service_record_id,
                s.completed_at,
                o.record_id,
                o.status,
                o.rejected_reason,
            )
            .select_from(ratings.join(outbox, o.rating_id == r.id).join(service_records, s.id == r.service_record_id))
            .where(r.rated_at >= start - timedelta(days=1), r.rated_at < end)
            .order_by(o.id)
        )
        totals = DayTotals(day)
        with self.store.engine.connect() as connection:
            rows = connection.execute(query).mappings().all()
            invited = _invitation_channels(connection, {row["service_record_id"] for row in rows if row["is_default"]})
        for row in rows:
            moment = assess_moment(
                EvaluationFacts(
                    record_id=row["record_id"],
                    level=row["level"],
                    channel=row["channel"],
                    rated_at=row["rated_at"],
                    project_no="",
                    kind="",
                    completed_at=row["completed_at"],
                )
            )
            if not start <= moment < end:
                continue
            pf = pf_code(
                row["channel"], is_default=row["is_default"], invitation_channel=invited.get(row["service_record_id"])
            )
            level = str(row["level"])
            _add(totals.stored, pf, level)
            if row["status"] == PUSHED:
                _add(totals.pushed, pf, level)
            elif row["status"] == REJECTED:
                totals.rejected.append((row["record_id"], row["rejected_reason"] or ""))
            else:
                totals.pending.append(row["record_id"])
        return totals


def _add(counts: dict[str, dict[str, int]], pf: str, level: str) -> None:
    counts.setdefault(pf, {}).setdefault(level, 0)
    counts[pf][level] += 1


def _chunks(values: Sequence[Any]) -> Iterable[list[Any]]:
    values = list(values)
    for start in range(0, len(values), _CHUNK):
        yield values[start : start + _CHUNK]


def _evaluation_facts(connection: Connection, rating_ids: Sequence[int]) -> dict[int, EvaluationFacts]:
    """The facts of each rating, with its service record, parent, invitation channel and batch/theme."""
    if not rating_ids:
        return {}
    parent = ratings.alias("parent")
    r, s = ratings.c, service_records.c
    columns = [
        r.id,
        r.record_id,
        r.level,
        r.channel,
        r.rated_at,
        r.is_default,
        r.is_follow_up,
        r.overall,
        r.comment,
        r.reasons,
        r.service_record_id,
        s.external_id,
        *(getattr(s, name) for name in _SERVICE_FIELDS),
        parent.c.record_id.label("parent_record_id"),
    ]
    rows: list[Any] = []
    for chunk in _chunks(rating_ids):
        query = (
            select(*columns)
            .select_from(
                ratings.join(service_records, s.id == r.service_record_id).outerjoin(
                    parent, parent.c.id == r.parent_rating_id
                )
            )
            .where(r.id.in_(chunk))
        )
        rows.extend(connection.execute(query).mappings().all())
    invited = _invitation_channels(connection, {row["service_record_id"] for row in rows if row["is_default"]})
    related = _related_items(
        connection,
        batches={row["batch_id"] for row in rows if row["batch_id"]},
        themes={row["theme_id"] for row in rows if row["theme_id"] and row["overall"]},
    )
    facts: dict[int, EvaluationFacts] = {}
    for row in rows:
        group: list[RatedItem] = list(related.get(("batch", row["batch_id"]), ())) if row["batch_id"] else []
        if row["overall"] and row["theme_id"]:
            group.extend(related.get(("theme", row["theme_id"]), ()))
        facts[row["id"]] = EvaluationFacts(
            record_id=row["record_id"],
            level=row["level"],
            channel=row["channel"],
            rated_at=row["rated_at"],
            project_no=row["external_id"],
            is_default=row["is_default"],
            is_follow_up=row["is_follow_up"],
            overall=row["overall"],
            comment=row["comment"],
            reasons=row["reasons"],
            parent_record_id=row["parent_record_id"],
            invitation_channel=invited.get(row["service_record_id"]),
            related=tuple(group),
            **{name: row[name] for name in _SERVICE_FIELDS},
        )
    return facts


def _invitation_channels(connection: Connection, service_record_ids: Iterable[int]) -> dict[int, str]:
    """The channel of each record's latest invitation: a default rating is reported under it (SPEC R3.4)."""
    channels: dict[int, str] = {}
    for chunk in _chunks(sorted(service_record_ids)):
        query = (
            select(invitations.c.service_record_id, invitations.c.channel)
            .where(invitations.c.service_record_id.in_(chunk))
            .order_by(invitations.c.id)
        )
        for record_id, channel in connection.execute(query):
            channels[record_id] = channel
    return channels


def _related_items(
    connection: Connection, *, batches: set[str], themes: set[str]
) -> dict[tuple[str, str], list[RatedItem]]:
    """The records of each batch and theme (SPEC R1.6)."""
    s = service_records.c
    found: dict[tuple[str, str], list[RatedItem]] = defaultdict(list)
    for kind, column, keys in (("batch", s.batch_id, batches), ("theme", s.theme_id, themes)):
        for chunk in _chunks(sorted(keys)):
            query = select(s.external_id, s.batch_id, s.theme_id).where(column.in_(chunk)).order_by(s.id)
            for external_id, batch_id, theme_id in connection.execute(query):
                key = batch_id if kind == "batch" else theme_id
                found[(kind, key)].append(RatedItem(external_id, batch_id=batch_id, theme_id=theme_id))
    return found


def _case_facts(connection: Connection, case_ids: Sequence[int]) -> dict[int, CaseFacts]:
    c = bad_rating_cases.c
    facts: dict[int, CaseFacts] = {}
    for chunk in _chunks(case_ids):
        query = (
            select(bad_rating_cases, ratings.c.record_id.label("evaluation_record_id"))
            .select_from(bad_rating_cases.join(ratings, ratings.c.id == c.rating_id))
            .where(c.id.in_(chunk))
        )
        for row in connection.execute(query).mappings():
            deadline_field = case_deadline_field(row["status"])
            facts[row["id"]] = CaseFacts(
                case_no=row["case_no"],
                version=row["version"],
                status=row["status"],
                evaluation_record_id=row["evaluation_record_id"],
                updated_at=row["updated_at"],
                deadline=row[deadline_field] if deadline_field else None,
                note=row["note"],
            )
    return facts


def _case_to_payload(facts: CaseFacts) -> dict[str, Any]:
    return {
        "case_no": facts.case_no,
        "version": facts.version,
        "status": facts.status,
        "evaluation_record_id": facts.evaluation_record_id,
        "updated_at": facts.updated_at.isoformat(),
        "deadline": facts.deadline.isoformat() if facts.deadline else None,
        "note": facts.note,
    }


def _case_from_payload(payload: Mapping[str, Any]) -> CaseFacts:
    return CaseFacts(
        case_no=payload["case_no"],
        version=int(payload["version"]),
        status=payload["status"],
        evaluation_record_id=payload["evaluation_record_id"],
        updated_at=datetime.fromisoformat(payload["updated_at"]),
        deadline=datetime.fromisoformat(payload["deadline"]) if payload.get("deadline") else None,
        note=payload.get("note"),
    )
