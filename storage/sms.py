"""The SMS channel's side of the store: invitations, the sending queue, receipts, replies.

Every step is one short transaction, run in a worker thread (:mod:`storage.deferred`):

- :meth:`SmsStore.create_invitations` finds completed, unrated records and gives each one
  invitation (SPEC R3.1), one for a whole batch or theme (R1.6); a unique index and an
  advisory lock on PostgreSQL make two instances' races harmless.
- :meth:`SmsStore.run_due_steps` takes the invitations whose next step is due, row-locked
  (``FOR UPDATE SKIP LOCKED`` on PostgreSQL), and queues the invitation or the reminder or
  records the default rating, as :func:`gateway.sms.schedule.next_action` says (R3.2–R3.4).
- :meth:`SmsStore.claim_messages` leases queued messages to one sender; a part is recorded with
  the SMSC's message id only when its ``submit_sm_resp`` said so (:meth:`record_acks`), so a
  restart re-sends only parts that were never acknowledged (R3.7).
- :meth:`SmsStore.store_receipt` and :meth:`SmsStore.store_reply` keep every ``deliver_sm``
  before it is acknowledged (R3.7a), and a reply that completes a message is parsed,
  correlated and answered in the same transaction (R3.5, R3.6, R3.8).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, delete, exists, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from gateway.privacy import InvalidPhoneNumber, normalise_phone
from gateway.rating import Channel, rating_group
from gateway.sms import text as sms_text
from gateway.sms.receipts import DeliveryState, candidate_ids, normalise_message_id
from gateway.sms.replies import OptOut, Rating, ReplyWindow, Unclear, answer_text, parse_reply
from gateway.sms.schedule import (
    Done,
    InvitationState,
    RecordDefaultRating,
    SendInvitation,
    SendReminder,
    SentMessage,
    next_action,
)
from gateway.sms.settings import SmsSettings, is_mobile, smpp_destination
from gateway.workdays import CalendarUnknownError, WorkingDayCalendar
from storage.schema import (
    invitations,
    message_parts,
    messages,
    opt_outs,
    ratings,
    service_records,
    sms_inbox,
)
from storage.store import Store, utcnow

log = logging.getLogger("gateway.sms.store")

SMS = "sms"
PRIORITY_ANSWER = 0  # answers to a citizen's own message go first (SPEC R3.7a)
PRIORITY_BULK = 5
#: Invitation statuses whose schedule still runs.
OPEN_STATUSES = ("scheduled", "sent", "reminded")
#: How long a repeated delivery of the same reply part is recognised as a repeat (SPEC R3.7a).
REPEAT_WINDOW = timedelta(minutes=30)
#: Parts of a multi-part reply older than this with the message still incomplete are given up.
REASSEMBLY_TIMEOUT = timedelta(minutes=30)
#: How often an invitation whose window's year the calendar does not know yet looks again.
CALENDAR_RETRY = timedelta(hours=1)
#: How often an invitation of a record without a number looks for one, until its window ends.
NO_NUMBER_RECHECK = timedelta(hours=1)


@dataclass(frozen=True)
class OutgoingMessage:
    """A queued message leased to one sender, with the parts of this attempt already acknowledged."""

    id: int
    destination: str  # as the SMSC takes it (gateway.sms.settings.smpp_destination)
    source: str
    body: str
    attempt: int
    concat_ref: int
    acknowledged: frozenset[int] = field(default_factory=frozenset)
    urgent: bool = False  # an answer to the citizen's own message (SPEC R3.7a), not bulk


@dataclass(frozen=True)
class Ack:
    """One part's ``submit_sm_resp`` with ESME_ROK: the message-id mapping to keep (SPEC R3.7)."""

    message_id: int
    attempt: int
    seq: int
    total: int
    smsc_id: str
    complete: bool  # every part of this attempt is now acknowledged


@dataclass(frozen=True, order=True)
class ScanPosition:
    """Where the invitation scan stands: after the record ``record_id`` updated at ``at``."""

    at: datetime
    record_id: int = 0

    def back(self, margin: timedelta) -> ScanPosition:
        """Some time earlier, for records whose transactions committed late."""
        return ScanPosition(self.at - margin)


@dataclass(frozen=True)
class StepCounts:
    invitations: int = 0
    reminders: int = 0
    defaults: int = 0
    deferred: int = 0
    done: int = 0


@dataclass(frozen=True)
class ReplyOutcome:
    """What became of a stored reply part (for logs and tests; no personal data)."""

    status: str  # repeat | waiting | rated | already_rated | closed | not_invited | unclear | opt_out
    answered: bool = False


class SmsStore:
    def __init__(self, store: Store, settings: SmsSettings, calendar: WorkingDayCalendar) -> None:
        self.store = store
        self.settings = settings
        self.calendar = calendar

    @property
    def _insert(self) -> Any:
        return sqlite.insert if self.store.is_sqlite else postgresql.insert

    # -- the schedule (SPEC R3.1-R3.4) -----------------------------------------------------------

    def create_invitations(
        self,
        since: ScanPosition | datetime,
        *,
        now: datetime | None = None,
        limit: int = 2000,
        pages: int = 5,
    ) -> ScanPosition:
        """Give one SMS invitation to each service completed without a rating, updated after ``since``.

        Eligible: a matter with a completion time, or a hotline call that ended not rated
        (SPEC R2.3). One without a mobile number gets no SMS, only the default rating when its
        window ends (R3.4). A batch (批量业务) or a theme (主题式"一件事") is one service to the
        citizen (R1.6), looked at whole whenever one of its items changed: one invitation for all
        its items, none once it is rated, and for a theme only once all its matters are
        completed, its window running from the last completion. The invitation goes to an item
        whose number can get an SMS, if one can.

        Records are read in ``(updated_at, id)`` order, ``limit`` at a time (one transaction
        each), at most ``pages`` pages a call, so that a large import is taken in turns with the
        store's other work. Returns the position reached, for the next call's ``since`` (callers
        go back a margin from time to time for transactions that commit late).
        """
        now = now or utcnow()
        position = since if isinstance(since, ScanPosition) else ScanPosition(since)
        for _ in range(pages):
            count, last = self._invite_page(position, now, limit)
            if last is None:
                break
            position = last
            if count < limit:
                break
        return position

    def _invite_page(self, after: ScanPosition, now: datetime, limit: int) -> tuple[int, ScanPosition | None]:
        """One page of :meth:`create_invitations`: how many records it looked at, and the last one."""
        s, i, r = service_records.c, invitations.c, ratings.c
        lone = and_(
            s.batch_id.is_(None),
            s.theme_id.is_(None),
            s.completed_at.is_not(None),
            or_(s.kind == "matter", s.unrated_reason.is_not(None)),
            ~exists().where(i.service_record_id == s.id, i.channel == SMS),
            ~exists().where(r.service_record_id == s.id, r.is_attempt.is_(False)),
        )
        in_group = and_(or_(s.batch_id.is_not(None), s.theme_id.is_not(None)), ~_group_invited(s))
        page = (
            select(s.id, s.completed_at, s.updated_at, s.batch_id, s.theme_id)
            .where(
                or_(s.updated_at > after.at, and_(s.updated_at == after.at, s.id > after.record_id)),
                or_(lone, in_group),
            )
            .order_by(s.updated_at, s.id)
            .limit(limit)
        )
        with self.store.engine.begin() as connection:
            # Two instances must not each invite another item of one batch or theme.
            self._lock(connection, "hcp-sms-invitations")
            rows = connection.execute(page).mappings().all()
            if not rows:
                return 0, None
            chosen = [dict(row) for row in rows if rating_group(row["batch_id"], row["theme_id"]) is None]
            chosen.extend(self._group_invitees(connection, _groups_of(rows)))
            if chosen:
                connection.execute(
                    self._insert(invitations).on_conflict_do_nothing(index_elements=["service_record_id", "channel"]),
                    [self._new_invitation(row["id"], row["completed_at"], now) for row in chosen],
                )
        return len(rows), ScanPosition(rows[-1]["updated_at"], rows[-1]["id"])

    def _new_invitation(self, record_id: int, completed_at: datetime, now: datetime) -> dict[str, Any]:
        send_after = completed_at + self.settings.schedule.invite_delay
        return {
            "service_record_id": record_id,
            "channel": SMS,
            "extension_code": self.settings.extension_code(record_id),
            "status": "scheduled",
            "send_after": send_after,
            "closes_at": self._closes_at(completed_at),
            "next_step_at": send_after,
            "created_at": now,
        }

    def _group_invitees(self, connection: Connection, groups: Collection[tuple[str, str]]) -> list[dict[str, Any]]:
        """For each batch or theme to be asked now (R1.6): the item to invite, with the group's completion.

        A group is asked once: not while one of its items has an open invitation, nor once it is
        rated (a batch by a rating of any item; a theme by its overall rating, or when every
        matter was rated, on its own or with its batch), nor while a matter of a theme is not
        completed. A group whose question closed and that is open again (a matter added to a
        theme rated matter by matter) is asked on an item that had no invitation yet.
        """
        s, i, r = service_records.c, invitations.c, ratings.c
        invited = exists().where(i.service_record_id == s.id, i.channel == SMS)
        asking = exists().where(i.service_record_id == s.id, i.channel == SMS, i.status.in_(OPEN_STATUSES))
        own = exists().where(r.service_record_id == s.id, r.is_attempt.is_(False), r.overall.is_(False))
        themes = sorted(key for kind, key in groups if kind == "theme")
        overall = self._themes_rated_overall(connection, themes)
        unrated = self._themes_with_unrated_matters(connection, themes)
        members: dict[tuple[str, str], list[Any]] = {}
        for kind, column, of_groups in _group_queries(groups):
            query = select(
                column.label("key"),
                s.id,
                s.completed_at,
                s.mobile_enc,
                s.mobile_hash,
                invited.label("invited"),
                asking.label("asking"),
                own.label("rated"),
            ).where(of_groups)
            for row in connection.execute(query.order_by(s.id)).mappings():
                members.setdefault((kind, row["key"]), []).append(row)
        hashes = {item["mobile_hash"] for items in members.values() for item in items if item["mobile_hash"]}
        opted = self._opted_out(connection, hashes)
        chosen: list[dict[str, Any]] = []
        for (kind, key), items in members.items():
            if any(item["asking"] for item in items):
                continue
            if kind == "theme" and (key in overall or key not in unrated):
                continue
            if kind == "batch" and any(item["rated"] for item in items):
                continue
            if any(item["completed_at"] is None for item in items):
                if kind == "theme":
                    continue  # asked when its last matter is done
                items = [item for item in items if item["completed_at"] is not None]
            # A matter rated on its own can still hold its theme's overall rating (its own slot).
            candidates = [item for item in items if not item["invited"]]
            if not candidates:
                continue
            reachable = [item for item in candidates if self._can_text(item, opted)]
            completed_at = max(item["completed_at"] for item in items)
            chosen.append({"id": (reachable or candidates)[0]["id"], "completed_at": completed_at})
        return chosen

    def _can_text(self, row: Any, opted: Collection[str]) -> bool:
        """Whether the record's number can get an SMS: a mobile that did not opt out (R3.8)."""
        if row["mobile_enc"] is None or row["mobile_hash"] in opted:
            return False
        return is_mobile(self.store.protector.decrypt(row["mobile_enc"]))

    def _opted_out(self, connection: Connection, hashes: Collection[str]) -> set[str]:
        found: set[str] = set()
        for chunk in _chunks(sorted(hashes)):
            found.update(
                connection.execute(select(opt_outs.c.phone_hash).where(opt_outs.c.phone_hash.in_(chunk))).scalars()
            )
        return found

    def run_due_steps(self, *, now: datetime | None = None, limit: int = 500) -> StepCounts:
        """Take the invitations whose next step is due and do it, each exactly once (R3.1-R3.4).

        The rows are locked for the transaction (``SKIP LOCKED`` on PostgreSQL; SQLite has one
        writer), and every effect — the queued message, the default rating — commits with the
        invitation's new step, so a crash repeats nothing and forgets nothing.
        """
        now = now or utcnow()
        i, s = invitations.c, service_records.c
        due = (
            select(
                i.id,
                i.service_record_id,
                i.status,
                i.extension_code,
                i.sent_at,
                i.reminded_at,
                i.closes_at,
                s.completed_at,
                s.matter_name,
                s.mobile_enc,
                s.mobile_hash,
                s.batch_id,
                s.theme_id,
            )
            .join(service_records, s.id == i.service_record_id)
            .where(i.channel == SMS, i.status.in_(OPEN_STATUSES), i.next_step_at <= now)
            .order_by(i.next_step_at)
            .limit(limit)
        )
        if not self.store.is_sqlite:
            due = due.with_for_update(of=invitations, skip_locked=True)
        counts = {"invitations": 0, "reminders": 0, "defaults": 0, "deferred": 0, "done": 0}
        with self.store.engine.begin() as connection:
            rows = connection.execute(due).mappings().all()
            if not rows:
                return StepCounts()
            record_ids = [row["service_record_id"] for row in rows]
            rated = set(
                connection.execute(
                    select(ratings.c.service_record_id).where(
                        ratings.c.service_record_id.in_(record_ids), ratings.c.is_attempt.is_(False)
                    )
                ).scalars()
            )
            # R1.6: the citizen's rating of one item of a batch rates every item: no reminder,
            # and no default rating that would stand for the other items instead of theirs.
            rated.update(
                connection.execute(select(s.id).where(s.id.in_(record_ids), _batch_rated(s.batch_id))).scalars()
            )
            # A theme's invitation asks for its overall rating: answered by one, or once every
            # matter was rated on its own; a rating of the invited matter alone does not answer it.
            themes = {row["theme_id"] for row in rows if row["theme_id"]}
            overall = self._themes_rated_overall(connection, themes)
            unrated = self._themes_with_unrated_matters(connection, themes)
            for row in rows:
                if row["theme_id"]:
                    if row["theme_id"] in overall or row["theme_id"] not in unrated:
                        rated.add(row["service_record_id"])
                    else:
                        rated.discard(row["service_record_id"])
            first = self._first_invitations(connection, rows)
            sizes = self._group_sizes(connection, rows)
            completions = self._group_completions(connection, _groups_of(rows))
            hashes = {row["mobile_hash"] for row in rows}
            opted = self._opted_out(connection, {h for h in hashes if h})
            history = self._history(connection, hashes, now)
            for row in rows:
                group = rating_group(row["batch_id"], row["theme_id"])
                if group is not None and first.get(group, row["id"]) != row["id"]:
                    counts[self._supersede(connection, row)] += 1
                    continue
                row = {**row, "items": sizes.get(group, 1) if group else 1}
                if group is not None and group in completions and row["service_record_id"] not in rated:
                    row, waits = self._as_group(connection, row, group, completions[group], now)
                    if waits:
                        counts["deferred"] += 1
                        continue
                counts[self._step(connection, row, row["service_record_id"] in rated, opted, history, now)] += 1
        return StepCounts(**counts)

    def _group_completions(
        self, connection: Connection, groups: Collection[tuple[str, str]]
    ) -> dict[tuple[str, str], tuple[datetime | None, int]]:
        """Each batch's or theme's last completion, and how many of its items are not completed."""
        s = service_records.c
        found: dict[tuple[str, str], tuple[datetime | None, int]] = {}
        for kind, column, of_groups in _group_queries(groups):
            query = select(column, func.max(s.completed_at), func.count() - func.count(s.completed_at))
            for key, last, open_items in connection.execute(query.where(of_groups).group_by(column)):
                found[(kind, key)] = (last, int(open_items))
        return found

    def _as_group(
        self,
        connection: Connection,
        row: Any,
        group: tuple[str, str],
        completion: tuple[datetime | None, int],
        now: datetime,
    ) -> tuple[Any, bool]:
        """The invitation's step as its group's (R1.6): (the row to step with, whether it waits instead).

        The group changes after the invitation was made: a matter linked to its theme, an item
        completed later. A theme with a matter not completed waits; the window runs from the
        group's last completion, moved while the invitation was not sent yet.
        """
        last, open_items = completion
        where = invitations.c.id == row["id"]
        own_window = row["closes_at"]
        if group[0] == "theme" and open_items and row["sent_at"] is None and (own_window is None or now < own_window):
            # Not asked yet about an unfinished theme: wait for it, but not past the invitation's
            # own window, whose end still brings the default (R3.4). One sent keeps its deadline.
            later = now + NO_NUMBER_RECHECK if own_window is None else min(now + NO_NUMBER_RECHECK, own_window)
            connection.execute(update(invitations).where(where).values(next_step_at=later))
            return row, True
        if last is None or last == row["completed_at"]:
            return row, False
        row = {**row, "completed_at": last}
        if row["sent_at"] is None:  # not told a deadline yet: it runs from the last completion
            send_after = last + self.settings.schedule.invite_delay
            closes = self._closes_at(last)
            values = {"send_after": send_after, "closes_at": closes}
            row = {**row, "closes_at": closes}
            if send_after > now:
                connection.execute(update(invitations).where(where).values(**values, next_step_at=send_after))
                return row, True
            connection.execute(update(invitations).where(where).values(**values))
        return row, False

    def _closes_at(self, completed_at: datetime) -> datetime | None:
        """The window's end (R3.4), or None while the calendar of its year is not known.

        Never a guess, and never a stop either: the invitation is kept, and its first step
        waits (``CALENDAR_RETRY``) until the year is known, from a newer ``chinese-calendar``
        or ``[calendar] override_file``; every other invitation goes on meanwhile.
        """
        try:
            return self.settings.schedule.closes_at(completed_at, self.calendar)
        except CalendarUnknownError as error:
            log.error("event=sms.calendar_unknown detail=%r action=%s", str(error), "set [calendar] override_file")
            return None

    def _step(
        self,
        connection: Connection,
        row: Any,
        rated: bool,
        opted: set[str],
        history: dict[str, list[SentMessage]],
        now: datetime,
    ) -> str:
        i = invitations.c
        where = i.id == row["id"]
        if row["closes_at"] is None:  # the calendar of its year was not known when it was made
            closes = self._closes_at(row["completed_at"])
            if closes is None:
                connection.execute(update(invitations).where(where).values(next_step_at=now + CALENDAR_RETRY))
                return "deferred"
            connection.execute(update(invitations).where(where).values(closes_at=closes))
            row = {**row, "closes_at": closes}
        phone = self.store.protector.decrypt(row["mobile_enc"]) if row["mobile_enc"] is not None else None
        # A land line, or no number at all, cannot get an SMS: no sends, only the default at the
        # window's end (R3.4 holds for every completed service, whatever it can be asked by).
        no_sms = phone is None or row["mobile_hash"] in opted or not is_mobile(phone)
        if no_sms and row["sent_at"] is None and rating_group(row["batch_id"], row["theme_id"]) is not None:
            moved = self._to_reachable_item(connection, row, opted)
            if moved is not None:  # another item of the group can get it (R1.6, R3.1)
                row = moved
                phone = self.store.protector.decrypt(row["mobile_enc"])
                no_sms = False
                history.update(self._history(connection, [row["mobile_hash"]], now))
        state = InvitationState(
            completed_at=row["completed_at"],
            closes_at=row["closes_at"],
            sent_at=row["sent_at"],
            reminded_at=row["reminded_at"],
            rated=rated,
            opted_out=no_sms,
        )
        kind = "reminder" if row["sent_at"] is not None else "invitation"
        content = self._text(kind, row)
        sent = history.setdefault(row["mobile_hash"], [])
        action = next_action(state, now, self.settings.schedule, sent, content)
        unsent_group = row["sent_at"] is None and rating_group(row["batch_id"], row["theme_id"]) is not None
        if (
            (phone is None or (no_sms and unsent_group))
            and not isinstance(action, Done)
            and action.at > now + NO_NUMBER_RECHECK
        ):
            # No number yet: the record may get one in a later update (the intake fills fields
            # in), or another item of its group one that can get the SMS (a land line first, a
            # mobile completed later); its invitation is still due: look again until the window ends.
            connection.execute(update(invitations).where(where).values(next_step_at=now + NO_NUMBER_RECHECK))
            return "deferred"
        if isinstance(action, Done):
            connection.execute(update(invitations).where(where).values(status="rated", next_step_at=None))
            return "done"
        if action.at > now:
            connection.execute(update(invitations).where(where).values(next_step_at=action.at))
            return "deferred"
        if isinstance(action, RecordDefaultRating):
            # A theme's default is its overall rating, kept on the invited matter (R1.6).
            self.store.add_rating(
                connection,
                service_record_id=row["service_record_id"],
                level=action.level,
                channel=Channel.SYSTEM,
                raw_input=None,
                rated_at=action.at,
                is_default=True,
                overall=bool(row["theme_id"]),
            )
            connection.execute(update(invitations).where(where).values(status="closed", next_step_at=None))
            log.info("event=sms.default_rating invitation=%s", row["id"])
            return "defaults"
        self._queue(
            connection,
            invitation_id=row["id"],
            kind=kind,
            phone=phone,
            phone_hash=row["mobile_hash"],
            body=content,
            source=self.settings.source_for(row["extension_code"]),
            priority=PRIORITY_BULK,
            now=now,
        )
        sent.append(SentMessage(now, content))
        if isinstance(action, SendInvitation):
            after = action.at + self.settings.schedule.reminder_after
            connection.execute(update(invitations).where(where).values(status="sent", sent_at=now, next_step_at=after))
            return "invitations"
        assert isinstance(action, SendReminder)
        connection.execute(
            update(invitations).where(where).values(status="reminded", reminded_at=now, next_step_at=row["closes_at"])
        )
        return "reminders"

    def _to_reachable_item(self, connection: Connection, row: Any, opted: Collection[str]) -> Any | None:
        """Move the group's invitation to a completed item whose number can get the SMS, if there is one."""
        s, i = service_records.c, invitations.c
        group = rating_group(row["batch_id"], row["theme_id"])
        assert group is not None
        invited = exists().where(i.service_record_id == s.id, i.channel == SMS)
        for _kind, _column, of_groups in _group_queries({group}):
            query = (
                select(s.id, s.mobile_enc, s.mobile_hash, s.matter_name)
                .where(of_groups, s.completed_at.is_not(None), s.mobile_enc.is_not(None), ~invited)
                .order_by(s.id)
            )
            for item in connection.execute(query).mappings():
                if self._can_text(item, opted):
                    connection.execute(
                        update(invitations).where(i.id == row["id"]).values(service_record_id=item["id"])
                    )
                    moved = {name: item[name] for name in ("mobile_enc", "mobile_hash", "matter_name")}
                    return {**row, **moved, "service_record_id": item["id"]}
        return None

    def _text(self, kind: str, row: Any) -> str:
        make = sms_text.reminder_text if kind == "reminder" else sms_text.invitation_text
        return make(
            signature=self.settings.signature,
            matter_name=row["matter_name"],
            closes_at=row["closes_at"],
            key_map=self.settings.rules.key_map,
            items=row.get("items", 1),
            theme=bool(row.get("theme_id")),
        )

    def _themes_rated_overall(self, connection: Connection, theme_ids: Collection[str]) -> dict[str, bool]:
        """theme → whether its counted overall rating (SPEC R1.6) is the default one (R3.4)."""
        s, r = service_records.c, ratings.c
        found: dict[str, bool] = {}
        for chunk in _chunks(sorted(theme_ids)):
            query = (
                select(s.theme_id, r.is_default)
                .join(ratings, r.service_record_id == s.id)
                .where(s.theme_id.in_(chunk), r.overall.is_(True), r.is_attempt.is_(False))
            )
            for theme_id, is_default in connection.execute(query):
                found[theme_id] = bool(is_default)
        return found

    def _themes_with_unrated_matters(self, connection: Connection, theme_ids: Collection[str]) -> set[str]:
        """The themes that have a matter without a counted rating of its own (R1.6).

        A theme none of whose matters is left was rated matter by matter: its overall rating
        would cover nothing, so it is not asked for.
        """
        s, r = service_records.c, ratings.c
        item = service_records.alias("batch_item")
        own = exists().where(r.service_record_id == s.id, r.is_attempt.is_(False), r.overall.is_(False))
        by_batch = exists().where(  # a rating of one item of a batch rates every item (R1.6)
            s.batch_id.is_not(None),
            item.c.batch_id == s.batch_id,
            r.service_record_id == item.c.id,
            r.is_attempt.is_(False),
            r.overall.is_(False),
        )
        found: set[str] = set()
        for chunk in _chunks(sorted(theme_ids)):
            query = select(s.theme_id).where(s.theme_id.in_(chunk), ~own, ~by_batch).distinct()
            found.update(connection.execute(query).scalars())
        return found

    def _first_invitations(self, connection: Connection, rows: Iterable[Any]) -> dict[tuple[str, str], int]:
        """Each batch's or theme's first open SMS invitation: the one that asks it (R1.6).

        Stores written before one invitation per group had one per item; the other open ones
        are superseded (:meth:`_supersede`). One already closed or rated asks nothing more.
        """
        s, i = service_records.c, invitations.c
        found: dict[tuple[str, str], int] = {}
        for kind, column, of_groups in _group_queries(_groups_of(rows)):
            query = (
                select(column, func.min(i.id))
                .join(service_records, s.id == i.service_record_id)
                .where(of_groups, i.channel == SMS, i.status.in_(OPEN_STATUSES))
                .group_by(column)
            )
            found.update({(kind, key): int(pk) for key, pk in connection.execute(query)})
        return found

    def _supersede(self, connection: Connection, row: Any) -> str:
        """Another invitation of the group asks it: this one takes no more steps (R1.6, R3.3).

        One never sent is closed; one sent stays open for a reply within its window (the
        citizen has its text), but gets neither reminder nor default.
        """
        where = invitations.c.id == row["id"]
        if row["sent_at"] is None:
            connection.execute(update(invitations).where(where).values(status="superseded", next_step_at=None))
        else:
            connection.execute(update(invitations).where(where).values(next_step_at=None))
        return "done"

    def _group_sizes(self, connection: Connection, rows: Iterable[Any]) -> dict[tuple[str, str], int]:
        """How many records each row's batch or theme holds, for the invitation's wording (R1.6)."""
        s = service_records.c
        sizes: dict[tuple[str, str], int] = {}
        # A theme counts its matters: the items of a batch within it are one matter.
        theme_matters = func.count(func.coalesce(s.matter_code, s.external_id).distinct())
        for kind, column, of_groups in _group_queries(_groups_of(rows)):
            size = theme_matters if kind == "theme" else func.count()
            query = select(column, size).where(of_groups).group_by(column)
            sizes.update({(kind, key): int(count) for key, count in connection.execute(query)})
        return sizes

    def _history(self, connection: Connection, hashes: Iterable[str], now: datetime) -> dict[str, list[SentMessage]]:
        """Messages to each number within the caps' longest window (SPEC R3.10)."""
        m = messages.c
        since = now - self.settings.schedule.caps.longest_window
        history: dict[str, list[SentMessage]] = {}
        rows = connection.execute(
            select(m.phone_hash, m.created_at, m.send_after, m.body).where(
                m.phone_hash.in_(list(hashes)), m.direction == "out", m.created_at >= since
            )
        )
        for phone_hash, created_at, send_after, body in rows:  # a deferred message counts when it goes
            history.setdefault(phone_hash, []).append(SentMessage(max(created_at, send_after or created_at), body))
        return history

    def _queue(
        self,
        connection: Connection,
        *,
        invitation_id: int | None,
        kind: str,
        phone: str,
        phone_hash: str,
        body: str,
        source: str,
        priority: int,
        now: datetime,
        send_after: datetime | None = None,
    ) -> int:
        return int(
            connection.execute(
                insert(messages).values(
                    invitation_id=invitation_id,
                    direction="out",
                    kind=kind,
                    phone_enc=self.store.protector.encrypt(phone),
                    phone_hash=phone_hash,
                    body=body,
                    status="queued",
                    attempts=0,
                    send_after=send_after or now,
                    priority=priority,
                    source_addr=source,
                    created_at=now,
                    updated_at=now,
                )
            ).inserted_primary_key[0]
        )

    def next_step_at(self) -> datetime | None:
        """When the scheduler next has something to do (for its timer)."""
        i = invitations.c
        with self.store.engine.connect() as connection:
            return connection.execute(
                select(func.min(i.next_step_at)).where(i.channel == SMS, i.status.in_(OPEN_STATUSES))
            ).scalar()

    # -- sending (SPEC R3.1, R3.7) -------------------------------------------------------------

    def claim_messages(
        self,
        owner: str,
        limit: int,
        *,
        lease: float,
        holding: Collection[int] = (),
        now: datetime | None = None,
    ) -> list[OutgoingMessage]:
        """Lease up to ``limit`` queued messages to ``owner``, answers first, then oldest.

        ``holding`` are the messages ``owner`` still has parts of in flight: never claimed again
        while it does, even when their lease ran out (a link down for longer than the lease),
        or they would be sent twice (SPEC R3.1).
        """
        now = now or utcnow()
        m = messages.c
        claimable = [
            m.status == "queued",
            m.direction == "out",
            m.send_after <= now,
            or_(m.claimed_until.is_(None), m.claimed_until <= now),
        ]
        if holding:
            claimable.append(m.id.not_in(sorted(holding)))
        quiet = self.settings.schedule.quiet_hours
        if quiet is not None and quiet.contains(now):
            # R3.2 at the moment of sending too: a retry, or a backlog held while the SMSC was
            # down, waits for the morning; answers to a citizen's own message still go.
            claimable.append(m.kind.not_in(("invitation", "reminder")))
        due = select(m.id).where(*claimable).order_by(m.priority, m.id).limit(limit)
        if not self.store.is_sqlite:
            due = due.with_for_update(skip_locked=True)
        claim = (
            update(messages)
            .where(m.id.in_(due.scalar_subquery()))
            .values(claimed_by=owner, claimed_until=now + timedelta(seconds=lease))
            .returning(m.id, m.phone_enc, m.source_addr, m.body, m.attempts, m.priority)
        )
        with self.store.engine.begin() as connection:
            rows = connection.execute(claim).all()
            if not rows:
                return []
            rows.sort(key=lambda row: (row[5], row[0]))
            acked: dict[tuple[int, int], set[int]] = {}
            resumed = [row[0] for row in rows]
            p = message_parts.c
            for message_id, attempt, seq in connection.execute(
                select(p.message_id, p.attempt, p.seq).where(p.message_id.in_(resumed))
            ):
                acked.setdefault((message_id, attempt), set()).add(seq)
        decrypt = self.store.protector.decrypt
        return [
            OutgoingMessage(
                id=message_id,
                destination=smpp_destination(decrypt(phone_enc)),
                source=source or self.settings.source_addr,
                body=body,
                attempt=attempts,
                concat_ref=concat_reference(message_id, attempts),
                acknowledged=frozenset(acked.get((message_id, attempts), ())),
                urgent=priority < PRIORITY_BULK,
            )
            for message_id, phone_enc, source, body, attempts, priority in rows
        ]

    def renew_leases(self, owner: str, message_ids: Sequence[int], *, lease: float, now: datetime | None = None) -> int:
        """Extend ``owner``'s leases of messages it still has parts of in flight.

        A lease is how long other senders keep off a message; a sender whose parts wait longer
        than that (a link down, a throttling SMSC) renews it, so that no other instance sends
        the message again meanwhile (SPEC R3.1). Returns how many leases were still ``owner``'s.
        """
        now = now or utcnow()
        m = messages.c
        renewed = 0
        with self.store.engine.begin() as connection:
            for chunk in _chunks(sorted(message_ids)):
                renewed += connection.execute(
                    update(messages)
                    .where(m.id.in_(chunk), m.claimed_by == owner, m.status == "queued")
                    .values(claimed_until=now + timedelta(seconds=lease))
                ).rowcount
        return renewed

    def record_acks(self, acks: Sequence[Ack], *, now: datetime | None = None) -> int:
        """Keep each acknowledged part's message id; a message whose parts are all in is submitted.

        Receipts that arrived before their mapping (the SMSC can be that fast) are applied now.
        Returns the number of messages completed.
        """
        if not acks:
            return 0
        now = now or utcnow()
        m = messages.c
        rows = [
            {
                "message_id": ack.message_id,
                "attempt": ack.attempt,
                "seq": ack.seq,
                "total": ack.total,
                "smsc_id": normalise_message_id(ack.smsc_id)[:64],
                "smsc_id_raw": ack.smsc_id[:65],
                "status": "submitted",
                "submitted_at": now,
            }
            for ack in acks
        ]
        # By attempt: a late answer to an attempt already failed (a receipt said so while its
        # last part was in flight) completes nothing; the next attempt is still to be sent.
        complete: dict[int, list[int]] = {}
        for ack in acks:
            if ack.complete:
                complete.setdefault(ack.attempt, []).append(ack.message_id)
        with self.store.engine.begin() as connection:
            # The hot path of sending: one executemany at the driver, without per-row type
            # processing (the time is stored as UTC, as UTCDateTime would store it).
            at = _driver_time(connection, now)
            mark = "?" if connection.dialect.paramstyle == "qmark" else "%s"
            connection.exec_driver_sql(
                "INSERT INTO message_parts (message_id, attempt, seq, total, smsc_id, smsc_id_raw, status,"
                f" submitted_at) VALUES ({', '.join([mark] * 8)})"
                " ON CONFLICT (message_id, attempt, seq) DO NOTHING",
                [
                    (
                        row["message_id"],
                        row["attempt"],
                        row["seq"],
                        row["total"],
                        row["smsc_id"],
                        row["smsc_id_raw"],
                        "submitted",
                        at,
                    )
                    for row in rows
                ],
            )
            completed = 0
            for attempt, message_ids in sorted(complete.items()):
                for chunk in _chunks(message_ids):
                    completed += connection.execute(
                        update(messages)
                        .where(m.id.in_(chunk), m.status == "queued", m.attempts == attempt)
                        .values(status="submitted", claimed_by=None, claimed_until=None, updated_at=now)
                    ).rowcount
            self._match_waiting_receipts(connection, [row["smsc_id"] for row in rows], now)
        return completed

    def release_messages(
        self, message_ids: Sequence[int], *, owner: str | None = None, not_before: datetime | None = None
    ) -> None:
        """Give back leases: the unacknowledged parts go again, to whichever sender claims them.

        With ``owner``, only the leases that are still ``owner``'s: one that ran out and was
        claimed by another sender is that sender's now. With ``not_before``, not before then.
        """
        m = messages.c
        values: dict[str, Any] = {"claimed_by": None, "claimed_until": None}
        if not_before is not None:
            values["send_after"] = not_before
        with self.store.engine.begin() as connection:
            for chunk in _chunks(list(message_ids)):
                releasable = [m.id.in_(chunk), m.status == "queued"]
                if owner is not None:
                    releasable.append(m.claimed_by == owner)
                connection.execute(update(messages).where(*releasable).values(**values))

    def fail_attempts(
        self,
        errors: dict[int, str],
        *,
        attempts: dict[int, int] | None = None,
        now: datetime | None = None,
        final: Collection[int] = (),
    ) -> None:
        """The SMSC refused these messages, or reported them undelivered: try again, bounded (R3.7).

        A new attempt sends every part again under a new UDH reference; after ``max_attempts``
        the message is failed and reported. ``attempts`` names the attempt each error is about:
        one that is already over (a receipt failed it first) is not failed twice. The messages
        in ``final`` were refused for good (an invalid number …): failed at once.
        """
        if not errors:
            return
        now = now or utcnow()
        with self.store.engine.begin() as connection:
            for message_id, error in errors.items():
                attempt = (attempts or {}).get(message_id)
                self._fail_attempt(connection, message_id, error, now, attempt, final=message_id in final)

    def _fail_attempt(
        self,
        connection: Connection,
        message_id: int,
        error: str,
        now: datetime,
        attempt: int | None = None,
        *,
        final: bool = False,
    ) -> None:
        m = messages.c
        row = connection.execute(select(m.attempts, m.status).where(m.id == message_id)).first()
        if row is None or row.status not in ("queued", "submitted"):
            return
        if attempt is not None and row.attempts != attempt:  # that attempt is over already
            return
        attempts = row.attempts
        attempts += 1
        if attempts < self.settings.max_attempts and not final:
            values: dict[str, Any] = {
                "status": "queued",
                "attempts": attempts,
                "send_after": now + self.settings.retry_delay,
            }
            log.warning("event=sms.retry message=%s attempt=%s error=%s", message_id, attempts + 1, error)
        else:
            values = {"status": "failed", "attempts": attempts}
            log.error("event=sms.failed message=%s attempts=%s error=%s", message_id, attempts, error)
        connection.execute(
            update(messages)
            .where(m.id == message_id)
            .values(**values, error=error[:200], claimed_by=None, claimed_until=None, updated_at=now)
        )

    # -- receipts (SPEC R3.7) ------------------------------------------------------------------

    def store_receipt(
        self, smsc_id: str, state: DeliveryState, error: str | None, *, now: datetime | None = None
    ) -> str:
        """Keep a receipt and apply it to its part; returns matched | unmatched | repeat."""
        return self.store_receipts([(smsc_id, state, error)], now=now)[0]

    def store_unreadable_receipt(self, text: bytes, *, now: datetime | None = None) -> None:
        """Keep a receipt that names no message id or no state, for review (never guessed, R3.7).

        Its text is the SMSC's (ids, states, dates and at most the first characters of our own
        message), not the citizen's. Status ``unreadable`` in ``sms_inbox``.
        """
        body = text.decode("latin-1")[:500]
        with self.store.engine.begin() as connection:
            connection.execute(
                insert(sms_inbox).values(
                    kind="receipt",
                    status="unreadable",
                    dedupe_key=hashlib.sha256(text).hexdigest(),
                    body=body,
                    received_at=now or utcnow(),
                )
            )

    def store_receipts(
        self, receipts: Sequence[tuple[str, DeliveryState, str | None]], *, now: datetime | None = None
    ) -> list[str]:
        """Keep receipts in one transaction (a group commit) and apply each to its part (SPEC R3.7).

        Returns matched | unmatched | repeat for each; a repeat is the same id and state again.
        A handful of statements per batch, not per receipt: receipts come as fast as submits.
        """
        now = now or utcnow()
        q = sms_inbox.c
        outcomes: list[str] = []
        with self.store.engine.begin() as connection:
            normals = [normalise_message_id(smsc_id)[:64] for smsc_id, _, _ in receipts]
            seen: set[str] = set()
            for chunk in _chunks(sorted(set(normals))):
                seen.update(
                    connection.execute(select(q.dedupe_key).where(q.smsc_id.in_(chunk), q.kind == "receipt")).scalars()
                )
            fresh: list[tuple[int, str, DeliveryState, str | None, str]] = []
            for index, ((smsc_id, state, error), normal) in enumerate(zip(receipts, normals, strict=True)):
                key = f"receipt:{normal}:{state.value}"
                if key in seen:
                    outcomes.append("repeat")
                    continue
                seen.add(key)
                outcomes.append("")
                fresh.append((index, smsc_id, state, error, normal))
            if not fresh:
                return outcomes
            parts = self._parts_by_id(connection, [smsc_id for _, smsc_id, _, _, _ in fresh])
            rows = []
            matched: list[tuple[Any, DeliveryState, str | None]] = []
            for index, smsc_id, state, error, normal in fresh:
                part = next((parts[c] for c in candidate_ids(smsc_id) if c in parts), None)
                outcomes[index] = "matched" if part is not None else "unmatched"
                if part is not None:
                    matched.append((part, state, error))
                rows.append(
                    {
                        "kind": "receipt",
                        "status": "done" if part is not None else "unmatched",
                        "dedupe_key": f"receipt:{normal}:{state.value}",
                        "smsc_id": normal,
                        "receipt_state": state.value,
                        "error": error,
                        "body": smsc_id[:100],
                        "received_at": now,
                    }
                )
            connection.execute(insert(sms_inbox), rows)
            self._settle_parts(connection, matched, now)
        return outcomes

    def _parts_by_id(self, connection: Connection, smsc_ids: Iterable[str]) -> dict[str, Any]:
        """The latest part under each candidate form of each id."""
        p = message_parts.c
        wanted = sorted({candidate for smsc_id in smsc_ids for candidate in candidate_ids(smsc_id)})
        found: dict[str, Any] = {}
        for chunk in _chunks(wanted):
            for row in connection.execute(
                select(p.id, p.message_id, p.attempt, p.total, p.smsc_id, p.submitted_at).where(p.smsc_id.in_(chunk))
            ):
                current = found.get(row.smsc_id)
                if current is None or (row.submitted_at, row.id) > (current.submitted_at, current.id):
                    found[row.smsc_id] = row
        return found

    def _match_waiting_receipts(self, connection: Connection, smsc_ids: list[str], now: datetime) -> None:
        """Receipts that came before their part's mapping was kept: apply them now."""
        q = sms_inbox.c
        any_waiting = connection.execute(
            select(q.id).where(q.kind == "receipt", q.status == "unmatched").limit(1)
        ).first()
        if any_waiting is None:  # the usual case: answers are kept before their receipts
            return
        wanted = sorted({candidate for smsc_id in smsc_ids for candidate in candidate_ids(smsc_id)})
        waiting = []
        for chunk in _chunks(wanted):
            waiting.extend(
                connection.execute(
                    select(q.id, q.body, q.receipt_state, q.error).where(
                        q.smsc_id.in_(chunk), q.kind == "receipt", q.status == "unmatched"
                    )
                ).all()
            )
        if not waiting:
            return
        parts = self._parts_by_id(connection, [row.body for row in waiting])
        matched = []
        done = []
        for row in waiting:
            part = next((parts[c] for c in candidate_ids(row.body) if c in parts), None)
            if part is not None:
                matched.append((part, DeliveryState(row.receipt_state), row.error))
                done.append(row.id)
        for chunk in _chunks(done):
            connection.execute(update(sms_inbox).where(q.id.in_(chunk)).values(status="done"))
        self._settle_parts(connection, matched, now)

    def _settle_parts(
        self, connection: Connection, matched: list[tuple[Any, DeliveryState, str | None]], now: datetime
    ) -> None:
        """Record each part's receipt; a message is delivered when all its parts are, retried when one failed."""
        if not matched:
            return
        p, m = message_parts.c, messages.c
        final = [(part, state, error) for part, state, error in matched if state.is_final]
        interim = [(part, state) for part, state, _ in matched if not state.is_final]
        if interim:
            connection.execute(
                update(message_parts).where(p.id == bindparam("part_id")).values(receipt_state=bindparam("state")),
                [{"part_id": part.id, "state": state.value} for part, state in interim],
            )
        if not final:
            return
        connection.execute(
            update(message_parts)
            .where(p.id == bindparam("part_id"))
            .values(
                status=bindparam("new_status"),
                receipt_state=bindparam("state"),
                error=bindparam("err"),
                receipt_at=now,
            ),
            [
                {
                    "part_id": part.id,
                    "new_status": "failed" if state.is_failure else "delivered",
                    "state": state.value,
                    "err": error,
                }
                for part, state, error in final
            ],
        )
        failed = {
            part.message_id: f"receipt:{state.value}:{error or ''}" for part, state, error in final if state.is_failure
        }
        touched = {(part.message_id, part.attempt) for part, _, _ in final}
        ids = sorted({message_id for message_id, _ in touched})
        current: dict[int, tuple[str, int]] = {}
        for chunk in _chunks(ids):
            for message_id, status, attempts in connection.execute(
                select(m.id, m.status, m.attempts).where(m.id.in_(chunk))
            ):
                current[message_id] = (status, attempts)
        live = {
            (message_id, attempt)
            for message_id, attempt in touched
            if message_id in current
            and current[message_id][1] == attempt
            and current[message_id][0] in ("submitted", "queued")
        }
        for message_id, _ in sorted(live):
            if message_id in failed:
                self._fail_attempt(connection, message_id, failed[message_id], now)
        candidates = sorted(message_id for message_id, _ in live if message_id not in failed)
        delivered = []
        for chunk in _chunks(candidates):
            states: dict[int, list[tuple[str, int, int]]] = {}
            for message_id, attempt, status, total in connection.execute(
                select(p.message_id, p.attempt, p.status, p.total).where(p.message_id.in_(chunk))
            ):
                states.setdefault(message_id, []).append((status, attempt, total))
            for message_id in chunk:
                attempt = current[message_id][1]
                mine = [(status, total) for status, a, total in states.get(message_id, []) if a == attempt]
                if mine and len(mine) == mine[0][1] and all(status == "delivered" for status, _ in mine):
                    delivered.append(message_id)
        for chunk in _chunks(delivered):
            connection.execute(update(messages).where(m.id.in_(chunk)).values(status="delivered", updated_at=now))

    # -- replies (SPEC R3.5, R3.6, R3.8) -------------------------------------------------------

    def store_reply(
        self,
        sender: str,
        destination: str,
        payload: bytes,
        data_coding: int,
        *,
        concatenation: tuple[int, int, int] | None = None,
        now: datetime | None = None,
    ) -> ReplyOutcome:
        """Keep a reply (part), and when its message is whole, act on it — one transaction.

        ``concatenation`` is (reference, total, seq) of a multi-part message; its parts are kept
        as bytes and decoded together, so a character split across two parts survives. A part
        seen before within :data:`REPEAT_WINDOW` (same sender and reference and part, or the same
        single text) is a repeat and counted once (SPEC R3.7a).
        """
        now = now or utcnow()
        text = f"{data_coding}:{payload.hex()}" if concatenation else sms_text.decode_payload(payload, data_coding)
        try:
            phone = normalise_phone(sender)
        except InvalidPhoneNumber:
            log.warning("event=sms.reply_unreadable_sender")
            phone = None
        protector = self.store.protector
        phone_hash = protector.lookup_hash(phone) if phone else "invalid"
        if concatenation is not None:
            ref, total, seq = concatenation
            key = f"part:{ref}:{total}:{seq}"
        else:
            key = "text:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:40]
        q = sms_inbox.c
        with self.store.engine.begin() as connection:
            self._one_sender_at_a_time(connection, phone_hash)
            seen = connection.execute(
                select(q.id)
                .where(q.phone_hash == phone_hash, q.dedupe_key == key, q.received_at >= now - REPEAT_WINDOW)
                .limit(1)
            ).first()
            if seen is not None:
                return ReplyOutcome("repeat")
            connection.execute(
                insert(sms_inbox).values(
                    kind="reply",
                    status="pending",
                    phone_hash=phone_hash,
                    phone_enc=protector.encrypt(phone or sender),
                    destination_addr=destination[:21],
                    dedupe_key=key,
                    concat_ref=concatenation[0] if concatenation else None,
                    concat_total=concatenation[1] if concatenation else None,
                    concat_seq=concatenation[2] if concatenation else None,
                    body=text,
                    received_at=now,
                )
            )
            if concatenation is not None:
                whole = self._whole_message(connection, phone_hash, concatenation, now)
                if whole is None:
                    return ReplyOutcome("waiting")
                text = whole
            else:
                connection.execute(
                    update(sms_inbox)
                    .where(q.phone_hash == phone_hash, q.dedupe_key == key, q.status == "pending")
                    .values(status="done")
                )
            if phone is None:
                return ReplyOutcome("not_invited")
            return self._act_on_reply(connection, phone, phone_hash, destination, text, now)

    def _one_sender_at_a_time(self, connection: Connection, phone_hash: str) -> None:
        """Serialize the replies of one sender until this transaction ends.

        The parts of one reply, or an SMSC's second delivery of one, can be stored at the same
        moment by two threads or instances. Under PostgreSQL's READ COMMITTED neither sees the
        other's part, so neither would find the reply whole (nor the other a repeat). A lock
        per sender (a transaction-level advisory lock) makes the second wait for the first's
        commit. SQLite has one writer at a time already (``BEGIN IMMEDIATE``).
        """
        self._lock(connection, f"hcp-sms-reply:{phone_hash}")

    def _lock(self, connection: Connection, name: str) -> None:
        """A transaction-level advisory lock on PostgreSQL (SQLite has one writer at a time)."""
        if self.store.is_sqlite:
            return
        key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        connection.execute(select(func.pg_advisory_xact_lock(key)))

    def _whole_message(
        self, connection: Connection, phone_hash: str, concatenation: tuple[int, int, int], now: datetime
    ) -> str | None:
        ref, total, _ = concatenation
        q = sms_inbox.c
        same = and_(
            q.kind == "reply",
            q.status == "pending",
            q.phone_hash == phone_hash,
            q.concat_ref == ref,
            q.concat_total == total,
            q.received_at >= now - REASSEMBLY_TIMEOUT,
        )
        parts = dict(connection.execute(select(q.concat_seq, q.body).where(same)).all())
        if any(seq not in parts for seq in range(1, total + 1)):
            return None
        connection.execute(update(sms_inbox).where(same).values(status="done"))
        coding, _, _ = parts[1].partition(":")
        payload = b"".join(bytes.fromhex(parts[seq].partition(":")[2]) for seq in range(1, total + 1))
        return sms_text.decode_payload(payload, int(coding))

    def _act_on_reply(
        self, connection: Connection, phone: str, phone_hash: str, destination: str, text: str, now: datetime
    ) -> ReplyOutcome:
        parsed = parse_reply(text, self.settings.rules)
        opted_before = (
            connection.execute(select(opt_outs.c.phone_hash).where(opt_outs.c.phone_hash == phone_hash)).first()
            is not None
        )
        invitation = self._correlate(connection, phone_hash, destination)
        window, status = self._window(connection, invitation, now)
        invitation_id = invitation["id"] if invitation is not None else None
        connection.execute(
            insert(messages).values(
                invitation_id=invitation_id,
                direction="in",
                kind="reply",
                phone_hash=phone_hash,
                body=text,
                status="received",
                attempts=0,
                created_at=now,
                updated_at=now,
            )
        )
        if isinstance(parsed, OptOut):
            status = "opt_out"
            if not opted_before:
                connection.execute(insert(opt_outs).values(phone_hash=phone_hash, channel=SMS, created_at=now))
        elif isinstance(parsed, Rating) and window is ReplyWindow.OPEN:
            assert invitation is not None
            # A theme's invitation asks for its overall rating (R1.6), kept on the invited matter.
            _, _, counted = self.store.add_rating(
                connection,
                service_record_id=invitation["service_record_id"],
                level=parsed.level,
                channel=Channel.SMS,
                raw_input=parsed.raw[:500],
                rated_at=now,
                comment=parsed.comment or None,
                overall=invitation["theme_id"] is not None,
            )
            if counted:
                connection.execute(
                    update(invitations)
                    .where(invitations.c.id == invitation_id)
                    .values(status="rated", next_step_at=None)
                )
                status = "rated"
            else:
                window, status = ReplyWindow.ALREADY_RATED, "already_rated"
        elif isinstance(parsed, Unclear):
            status = "unclear" if window is ReplyWindow.OPEN else status
        answer = answer_text(
            parsed,
            window,
            signature=self.settings.signature,
            key_map=self.settings.rules.key_map,
            clarified_before=invitation is not None and invitation["clarified_at"] is not None,
            opted_out_before=opted_before,
        )
        if answer is not None:
            if isinstance(parsed, Unclear) and invitation_id is not None:
                connection.execute(
                    update(invitations).where(invitations.c.id == invitation_id).values(clarified_at=now)
                )
            # Answers count against the per-number caps too (R3.10): an auto-responder that
            # keeps replying gets its answers deferred, never dropped. Not the same-content cap:
            # two thanks of one level on one day are two answers, the second not a day late.
            sent = self._history(connection, [phone_hash], now).get(phone_hash, [])
            self._queue(
                connection,
                invitation_id=invitation_id,
                kind="answer",
                phone=phone,
                phone_hash=phone_hash,
                body=answer,
                source=self.settings.source_for(invitation["extension_code"] if invitation is not None else None),
                priority=PRIORITY_ANSWER,
                now=now,
                send_after=self.settings.schedule.caps.earliest(sent, now),
            )
        log.info("event=sms.reply outcome=%s answered=%s", status, answer is not None)
        return ReplyOutcome(status, answered=answer is not None)

    def _correlate(self, connection: Connection, phone_hash: str, destination: str) -> Any:
        """The invitation a reply answers: by extension code, else the most recent open one (R3.6)."""
        i, s = invitations.c, service_records.c
        base = (
            select(i.id, i.service_record_id, i.status, i.closes_at, i.clarified_at, i.extension_code)
            .add_columns(s.batch_id, s.theme_id)
            .join(service_records, s.id == i.service_record_id)
            .where(i.channel == SMS, s.mobile_hash == phone_hash, i.sent_at.is_not(None))
        )
        code = self.settings.extension_of(destination)
        if code is not None:
            row = connection.execute(base.where(i.extension_code == code).order_by(i.id.desc()).limit(1)).mappings()
            found = row.first()
            if found is not None:
                return found
        row = connection.execute(
            base.where(i.status.in_(OPEN_STATUSES)).order_by(i.sent_at.desc(), i.id.desc()).limit(1)
        ).mappings()
        found = row.first()
        if found is not None:
            return found
        return connection.execute(base.order_by(i.sent_at.desc(), i.id.desc()).limit(1)).mappings().first()

    def _window(self, connection: Connection, invitation: Any, now: datetime) -> tuple[ReplyWindow, str]:
        if invitation is None:
            return ReplyWindow.NOT_INVITED, "not_invited"
        is_default = self._answer(connection, invitation)
        if is_default is not None:
            # The default rating at the window's end (R3.4) is not the citizen's: the window closed.
            return (ReplyWindow.CLOSED, "closed") if is_default else (ReplyWindow.ALREADY_RATED, "already_rated")
        closes_at = invitation["closes_at"]  # None: its first step waits for the calendar, still open
        if invitation["status"] not in OPEN_STATUSES or (closes_at is not None and closes_at <= now):
            return ReplyWindow.CLOSED, "closed"
        return ReplyWindow.OPEN, "open"

    def _answer(self, connection: Connection, invitation: Any) -> bool | None:
        """Whether the question the invitation asked is answered: None if not, else whether by the default.

        A theme's question is answered by its overall rating, or by a rating of each matter; a
        batch's by a rating of any item (R1.6); a lone record's by its own rating.
        """
        theme_id, batch_id = invitation["theme_id"], invitation["batch_id"]
        r, s = ratings.c, service_records.c
        if theme_id:
            overall = self._themes_rated_overall(connection, [theme_id])
            if theme_id in overall:
                return overall[theme_id]
            return None if self._themes_with_unrated_matters(connection, [theme_id]) else False
        if batch_id:
            where = and_(s.batch_id == batch_id, s.theme_id.is_(None))
            query = select(r.is_default).join(service_records, s.id == r.service_record_id).where(where)
        else:
            query = select(r.is_default).where(r.service_record_id == invitation["service_record_id"])
        found = connection.execute(query.where(r.is_attempt.is_(False)).order_by(r.is_default).limit(1)).first()
        return None if found is None else bool(found.is_default)

    # -- housekeeping ----------------------------------------------------------------------------

    def expire_incomplete_replies(self, *, now: datetime | None = None) -> int:
        """Give up multi-part replies still missing parts after :data:`REASSEMBLY_TIMEOUT`."""
        now = now or utcnow()
        q = sms_inbox.c
        with self.store.engine.begin() as connection:
            result = connection.execute(
                update(sms_inbox)
                .where(q.kind == "reply", q.status == "pending", q.received_at < now - REASSEMBLY_TIMEOUT)
                .values(status="expired")
            )
        if result.rowcount:
            log.warning("event=sms.reply_incomplete parts=%s", result.rowcount)
        return int(result.rowcount or 0)

    def purge(self, *, older_than: timedelta = timedelta(days=30), now: datetime | None = None) -> int:
        """Drop inbox rows long settled; part mappings stay with their messages (kept ≥ 7 days, R3.7)."""
        now = now or utcnow()
        q = sms_inbox.c
        with self.store.engine.begin() as connection:
            result = connection.execute(
                delete(sms_inbox).where(q.received_at < now - older_than, q.status != "pending")
            )
        return int(result.rowcount or 0)

    def queue_counts(self) -> dict[str, int]:
        m = messages.c
        with self.store.engine.connect() as connection:
            rows = connection.execute(
                select(m.status, func.count()).where(m.direction == "out").group_by(m.status)
            ).all()
        return {status: int(count) for status, count in rows}


def concat_reference(message_id: int, attempt: int) -> int:
    """The UDH reference of a message's attempt: fixed, so a resumed send keeps it (SPEC R3.1).

    Consecutive messages to a number get different references (an 8-bit reference repeats only
    every 256 messages), and a retry differs from the attempt before.
    """
    return (message_id + 97 * attempt) & 0xFF


def _driver_time(connection: Connection, moment: datetime) -> Any:
    """``moment`` as the driver takes it for a UTCDateTime column (naive UTC; text on SQLite)."""
    naive = moment.astimezone(UTC).replace(tzinfo=None)
    if connection.dialect.name == "sqlite":
        return naive.strftime("%Y-%m-%d %H:%M:%S.%f")
    return naive


def _groups_of(rows: Iterable[Any]) -> set[tuple[str, str]]:
    """The batches and themes of ``rows``, named as :func:`gateway.rating.rating_group` names them."""
    return {group for row in rows if (group := rating_group(row["batch_id"], row["theme_id"])) is not None}


def _group_queries(groups: Collection[tuple[str, str]]) -> Iterable[tuple[str, Any, Any]]:
    """(kind, key column, condition) selecting the records of ``groups``, a chunk at a time (R1.6).

    A batch's items are its records outside any theme: an item of a theme goes with its theme.
    """
    s = service_records.c
    for kind, column in (("batch", s.batch_id), ("theme", s.theme_id)):
        for chunk in _chunks(sorted(key for group_kind, key in groups if group_kind == kind)):
            yield kind, column, and_(column.in_(chunk), s.theme_id.is_(None)) if kind == "batch" else column.in_(chunk)


def _group_invited(record: Any) -> Any:
    """SQL: an item of the record's theme, else of its batch, has an open SMS invitation (R1.6)."""
    item = service_records.alias("group_item")
    same_group = or_(
        and_(record.theme_id.is_not(None), item.c.theme_id == record.theme_id),
        and_(
            record.theme_id.is_(None),
            record.batch_id.is_not(None),
            item.c.batch_id == record.batch_id,
            item.c.theme_id.is_(None),  # an item of a theme was invited for its theme
        ),
    )
    return exists().where(
        same_group,
        invitations.c.service_record_id == item.c.id,
        invitations.c.channel == SMS,
        invitations.c.status.in_(OPEN_STATUSES),
    )


def _batch_rated(batch_id: Any) -> Any:
    """SQL: a citizen (not the default) gave a counted rating to an item of this batch (R1.6)."""
    sibling = service_records.alias("batch_item")
    return exists().where(
        batch_id.is_not(None),
        sibling.c.batch_id == batch_id,
        ratings.c.service_record_id == sibling.c.id,
        ratings.c.is_attempt.is_(False),
        ratings.c.is_default.is_(False),
        ratings.c.overall.is_(False),  # a theme's overall rating does not rate a batch through its item
    )


def _chunks(values: Sequence[Any], size: int = 500) -> Iterable[list[Any]]:
    for start in range(0, len(values), size):
        yield list(values[start : start + size])
