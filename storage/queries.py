"""Read-only look-ups for operators, supervisors and admins, and the store's side of the metrics.

Synchronous, like :mod:`storage.store`: Twisted code runs them in a store thread
(``DeferredStore.run``). Phones are masked in everything here but :func:`contact_view`, the
supervisors' call-back view, which writes its audit record in the same transaction as it reads
the number, so that no unmasked view goes unaudited (SPEC R5.1, R5.2).

Pages are keyset pages: a cursor names the last row of the page before (for ratings its
``rated_at`` and row id, the order of the listing), so a page never repeats or skips a row when
ratings arrive meanwhile, and a deep page costs what the first one does.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, insert, or_, select

from gateway.rating import Level
from storage.schema import audit_log, outbox, ratings, service_records
from storage.store import Store, StoredRating, utcnow

#: Filters of :func:`find_ratings_page`: the API's query parameter -> the service record's column.
SERVICE_FILTERS = {
    "call_id": "call_id",
    "linked_id": "linked_id",
    "work_order": "work_order",
    "agent": "agent_id",
    "matter": "matter_code",
    "department": "department_code",
    "service_id": "external_id",
}


class BadCursor(ValueError):
    """A cursor this API did not give out (or for another listing)."""


@dataclass(frozen=True)
class Page:
    items: list[Any]
    next_cursor: str | None  # None: this was the last page


def encode_cursor(*parts: str | int) -> str:
    return base64.urlsafe_b64encode("|".join(str(p) for p in parts).encode()).decode().rstrip("=")


def decode_cursor(cursor: str, count: int) -> list[str]:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BadCursor("cursor is not one this API gave out; start again without it") from None
    parts = text.split("|")
    if len(parts) != count:
        raise BadCursor("cursor is not one this API gave out; start again without it")
    return parts


# -- ratings (SPEC R5.2: operators' look-ups) -------------------------------------------------


def find_ratings_page(
    store: Store,
    filters: dict[str, str],
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 100,
    offset: int = 0,
    cursor: str | None = None,
) -> Page:
    """Ratings whose service record matches every filter, oldest first, phone masked (SPEC R5.1).

    ``filters`` maps names of :data:`SERVICE_FILTERS` to exact values; ``since`` is inclusive,
    ``until`` exclusive. Attempts (SPEC R1.4) are listed too, flagged.
    """
    s, r = service_records.c, ratings.c
    conditions: list[Any] = [getattr(s, SERVICE_FILTERS[name]) == value for name, value in filters.items()]
    if since is not None:
        conditions.append(r.rated_at >= since)
    if until is not None:
        conditions.append(r.rated_at < until)
    if cursor is not None:
        at_text, id_text = decode_cursor(cursor, 2)
        try:
            after_at, after_id = datetime.fromisoformat(at_text), int(id_text)
        except ValueError:
            raise BadCursor("cursor is not one this API gave out; start again without it") from None
        if after_at.tzinfo is None:
            raise BadCursor("cursor is not one this API gave out; start again without it")
        conditions.append(or_(r.rated_at > after_at, and_(r.rated_at == after_at, r.id > after_id)))
    query = (
        select(
            ratings,
            s.external_id,
            s.kind,
            s.call_id,
            s.linked_id,
            s.work_order,
            s.agent_id,
            s.matter_code,
            s.department_code,
            s.mobile_masked,
        )
        .join(service_records, r.service_record_id == s.id)
        .where(and_(*conditions))
        .order_by(r.rated_at, r.id)
        .limit(limit + 1)
        .offset(offset)
    )
    with store.engine.connect() as connection:
        rows = connection.execute(query).mappings().all()
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = None
    if more and rows:
        last = rows[-1]
        next_cursor = encode_cursor(last["rated_at"].astimezone(UTC).isoformat(), last["id"])
    return Page([_stored_rating(row) for row in rows], next_cursor)


def _stored_rating(row: Any) -> StoredRating:
    return StoredRating(
        record_id=row["record_id"],
        level=Level(row["level"]),
        channel=row["channel"],
        raw_input=row["raw_input"],
        comment=row["comment"],
        reasons=row["reasons"],
        is_default=row["is_default"],
        is_follow_up=row["is_follow_up"],
        is_attempt=row["is_attempt"],
        rated_at=row["rated_at"],
        service_id=row["external_id"],
        kind=row["kind"],
        call_id=row["call_id"],
        linked_id=row["linked_id"],
        work_order=row["work_order"],
        agent_id=row["agent_id"],
        matter_code=row["matter_code"],
        department_code=row["department_code"],
        mobile_masked=row["mobile_masked"],
    )


# -- the supervisors' call-back view (SPEC R4.1, R4.4, R5.1) ----------------------------------


def contact_view(
    store: Store, *, actor: str, role: str, rating_record_id: str | None = None, service_id: str | None = None
) -> dict[str, Any] | None:
    """The unmasked phone of one rating's (or one service record's) citizen, audited.

    The audit record (who, which record; never the number) is written in the transaction that
    reads the number: if it cannot be written, the number is not shown. None: no such record.
    """
    s, r = service_records.c, ratings.c
    if rating_record_id is not None:
        query = (
            select(s.external_id, s.kind, s.mobile_enc, s.mobile_masked, r.record_id, r.level)
            .join(ratings, r.service_record_id == s.id)
            .where(r.record_id == rating_record_id)
        )
        subject = f"rating:{rating_record_id}"
    else:
        query = select(s.external_id, s.kind, s.mobile_enc, s.mobile_masked).where(s.external_id == service_id)
        subject = f"service:{service_id}"
    with store.engine.begin() as connection:
        row = connection.execute(query).mappings().first()
        if row is None:
            return None
        phone = store.protector.decrypt(row["mobile_enc"]) if row["mobile_enc"] is not None else None
        detail = {"role": role, "serviceId": row["external_id"], "phoneShown": phone is not None}
        if rating_record_id is not None:
            detail["ratingRecordId"] = rating_record_id
        connection.execute(
            insert(audit_log).values(at=utcnow(), actor=actor, action="contact.view", subject=subject, detail=detail)
        )
    answer: dict[str, Any] = {
        "serviceId": row["external_id"],
        "kind": row["kind"],
        "mobile": phone,
        "mobileMasked": row["mobile_masked"],
        "audited": True,
    }
    if rating_record_id is not None:
        answer["recordId"] = row["record_id"]
        answer["level"] = int(row["level"])
    return answer


def audit_entries(store: Store, *, action: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """The latest audit records, newest first (for tests and admins)."""
    query = select(audit_log).order_by(audit_log.c.id.desc()).limit(limit)
    if action is not None:
        query = query.where(audit_log.c.action == action)
    with store.engine.connect() as connection:
        return [dict(row) for row in connection.execute(query).mappings()]


# -- records the platform rejected (SPEC R7.2) ------------------------------------------------


def rejected_records_page(store: Store, *, limit: int = 100, cursor: str | None = None) -> Page:
    """Outbox records the platform refused as invalid, with its reason, oldest first."""
    o = outbox.c
    conditions: list[Any] = [o.status == "rejected"]
    if cursor is not None:
        (id_text,) = decode_cursor(cursor, 1)
        if not id_text.isdigit():
            raise BadCursor("cursor is not one this API gave out; start again without it")
        conditions.append(o.id > int(id_text))
    query = (
        select(o.id, o.record_id, o.record_type, o.rejected_reason, o.attempts, o.created_at)
        .where(*conditions)
        .order_by(o.id)
        .limit(limit + 1)
    )
    with store.engine.connect() as connection:
        rows = connection.execute(query).mappings().all()
    more = len(rows) > limit
    rows = rows[:limit]
    items = [
        {
            "recordId": row["record_id"],
            "recordType": row["record_type"],
            "reason": row["rejected_reason"] or "",
            "attempts": row["attempts"],
            "queuedAt": row["created_at"].isoformat(),
        }
        for row in rows
    ]
    return Page(items, encode_cursor(rows[-1]["id"]) if more and rows else None)


# -- the store's side of /metrics -------------------------------------------------------------


@dataclass(frozen=True)
class StoreFigures:
    """What every instance sharing the store sees alike: counted ratings, the outbox."""

    ratings: dict[tuple[str, int], int]  # (channel, level) -> counted ratings (attempts excluded)
    outbox: dict[str, int]  # status -> rows
    oldest_pending_at: datetime | None


class StoreFigureCounter:
    """The figures of ``/metrics``, counted incrementally: a scrape costs the same after a year.

    Ratings and outbox rows are never deleted, and a rating's channel, level and attempt flag
    never change, so what was counted stays counted: each refresh counts only rows with a
    higher id than the last *settled* one. Rows younger than ``settle_seconds`` are counted
    afresh each time and not yet taken into the running totals, because on PostgreSQL a row with
    a lower id can commit after one with a higher id; a store transaction lasts well under a
    minute. Pending and rejected rows are counted directly (their index is small); pushed ones
    are the rest. One refresh at a time (:class:`gateway.metrics.GatewayMetrics` sees to it).
    """

    def __init__(self, settle_seconds: float = 60.0) -> None:
        self.settle = timedelta(seconds=settle_seconds)
        self._ratings: dict[tuple[str, int], int] = {}
        self._ratings_through = 0
        self._outbox_rows = 0
        self._outbox_through = 0

    def figures(self, store: Store) -> StoreFigures:
        r, o = ratings.c, outbox.c
        settled_before = utcnow() - self.settle
        with store.engine.connect() as connection:
            through = self._settle(connection, r.id, r.created_at, self._ratings_through, settled_before)
            if through > self._ratings_through:
                _add_counts(self._ratings, self._rating_counts(connection, self._ratings_through, through))
                self._ratings_through = through
            counted = dict(self._ratings)
            _add_counts(counted, self._rating_counts(connection, self._ratings_through, None))

            through = self._settle(connection, o.id, o.created_at, self._outbox_through, settled_before)
            if through > self._outbox_through:
                self._outbox_rows += self._row_count(connection, self._outbox_through, through)
                self._outbox_through = through
            rows = self._outbox_rows + self._row_count(connection, self._outbox_through, None)
            statuses = dict(
                connection.execute(
                    select(o.status, func.count()).where(o.status.in_(("pending", "rejected"))).group_by(o.status)
                ).all()
            )
            oldest = connection.execute(select(func.min(o.created_at)).where(o.status == "pending")).scalar_one()
        pending, rejected = int(statuses.get("pending", 0)), int(statuses.get("rejected", 0))
        return StoreFigures(
            counted, {"pending": pending, "pushed": max(rows - pending - rejected, 0), "rejected": rejected}, oldest
        )

    @staticmethod
    def _settle(connection: Any, id_column: Any, created: Any, after: int, settled_before: datetime) -> int:
        """The highest id of the rows older than the settling time (``after`` if none is new)."""
        found = connection.execute(
            select(func.max(id_column)).where(id_column > after, created < settled_before)
        ).scalar_one()
        return int(found) if found is not None else after

    @staticmethod
    def _rating_counts(connection: Any, after: int, through: int | None) -> dict[tuple[str, int], int]:
        r = ratings.c
        conditions = [r.id > after, r.is_attempt.is_(False)]
        if through is not None:
            conditions.append(r.id <= through)
        rows = connection.execute(
            select(r.channel, r.level, func.count()).where(*conditions).group_by(r.channel, r.level)
        ).all()
        return {(channel, int(level)): int(n) for channel, level, n in rows}

    @staticmethod
    def _row_count(connection: Any, after: int, through: int | None) -> int:
        o = outbox.c
        conditions = [o.id > after] + ([o.id <= through] if through is not None else [])
        return int(connection.execute(select(func.count()).select_from(outbox).where(*conditions)).scalar_one())


def _add_counts(into: dict[tuple[str, int], int], more: dict[tuple[str, int], int]) -> None:
    for key, n in more.items():
        into[key] = into.get(key, 0) + n


def store_figures(store: Store) -> StoreFigures:
    """The figures counted from scratch (a fresh counter): for tests and one-off reports."""
    return StoreFigureCounter().figures(store)
