"""The shared evaluation store's tables (SQLAlchemy Core).

One schema for SQLite and PostgreSQL; Alembic migrations in ``storage/migrations`` create it.
Personal data never appears in clear: ``*_enc`` columns hold AES-GCM ciphertext and
``*_hash`` columns the keyed lookup hash (SPEC R5.1); ``*_masked`` is what operators see.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    TypeDecorator,
    text,
)

# SQLite needs INTEGER PRIMARY KEY for its rowid alias; PostgreSQL gets a BIGINT identity.
Id = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware datetimes, stored as UTC on every backend.

    SQLite keeps no zone, so values are normalised to naive UTC on the way in and given
    their zone back on the way out; naive input is refused, never guessed.
    """

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; attach a time zone")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
    }
)


def sparse_index(table: str, column: str) -> Index:
    """An index of only the rows that have ``column``: a row without it writes no index page.

    A hotline call's record has no e-mail, department, batch or theme, and an imported
    matter's often no call ids. With one full index per look-up column, a commit of one call's
    rating wrote 25 pages to the WAL; with these, 20 (docs/performance.md). Every look-up compares
    the column with a value, which implies ``IS NOT NULL``, so SQLite and PostgreSQL both
    still use the index (tests/test_store.py checks the plans).
    """
    where = text(f"{column} IS NOT NULL")
    return Index(f"ix_{table}_{column}", column, sqlite_where=where, postgresql_where=where)


#: The service records' look-up columns, each with a :func:`sparse_index`.
SERVICE_RECORD_LOOKUPS = (
    "mobile_hash",
    "email_hash",
    "matter_code",
    "department_code",
    "agent_id",
    "work_order",
    "batch_id",
    "theme_id",
    "call_id",
    "linked_id",
)

service_records = Table(
    "service_records",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    # The id given by the system that reported the service (idempotency key of the intake).
    Column("external_id", String(64), nullable=False, unique=True),
    Column("kind", String(8), nullable=False),  # call | matter (SPEC R1.3)
    Column("completed_at", UTCDateTime(), nullable=True),
    Column("mobile_enc", LargeBinary, nullable=True),
    Column("mobile_hash", String(64), nullable=True),
    Column("mobile_masked", String(20), nullable=True),
    Column("email_enc", LargeBinary, nullable=True),
    Column("email_hash", String(64), nullable=True),
    Column("matter_code", String(64), nullable=True),
    Column("matter_name", String(200), nullable=True),
    Column("department_code", String(64), nullable=True),
    Column("department_name", String(200), nullable=True),
    Column("agent_id", String(64), nullable=True),
    Column("work_order", String(64), nullable=True),
    Column("batch_id", String(64), nullable=True),
    Column("theme_id", String(64), nullable=True),
    Column("call_id", String(64), nullable=True),  # Asterisk UNIQUEID
    Column("linked_id", String(64), nullable=True),  # Asterisk LINKEDID
    Column("queue", String(64), nullable=True),
    Column("applicant_type", String(2), nullable=True),  # PLATFORM.md userProp
    Column("area_code", String(12), nullable=True),
    # Why a call ended without a rating (SPEC R2.3): timeout | invalid | hangup | error.
    Column("unrated_reason", String(16), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    # Indexed: the SMS scheduler finds newly completed records by it (SPEC R3.1).
    Column("updated_at", UTCDateTime(), nullable=False, index=True),
    *(sparse_index("service_records", column) for column in SERVICE_RECORD_LOOKUPS),
)

ratings = Table(
    "ratings",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    # Stable id pushed to the platform (PLATFORM.md recordId), e.g. "ev-01J…".
    Column("record_id", String(64), nullable=False, unique=True),
    Column("service_record_id", Id, ForeignKey("service_records.id"), nullable=False, index=True),
    Column("level", SmallInteger, nullable=False),  # SPEC R1.2 score code, 5 = 非常满意
    Column("channel", String(16), nullable=False),
    Column("raw_input", Text, nullable=True),  # the key or the text as given (SPEC R1.2)
    Column("comment", Text, nullable=True),
    Column("reasons", String(100), nullable=True),  # comma-separated (SPEC R2.5)
    Column("voice_comment_ref", String(300), nullable=True),
    Column("is_default", Boolean, nullable=False, default=False),  # SPEC R3.4
    Column("is_follow_up", Boolean, nullable=False, default=False),  # SPEC R4.5
    Column("is_attempt", Boolean, nullable=False, default=False),  # SPEC R1.4: kept, not counted
    Column("overall", Boolean, nullable=False, default=False),  # SPEC R1.6 theme overall rating
    Column("parent_rating_id", Id, ForeignKey("ratings.id"), nullable=True),
    Column("visit_id", String(64), nullable=False, default="", server_default=""),  # SPEC R1.4 一次一评 at a window
    Column("review_flags", String(200), nullable=True),  # SPEC R5.3, for review, never dropped
    Column("rated_at", UTCDateTime(), nullable=False, index=True),
    Column("created_at", UTCDateTime(), nullable=False),
    # SPEC R1.4: one counted rating per record (and visit); a race between two instances ends
    # in an integrity error here, and the loser is kept as an attempt. A theme's overall rating,
    # kept on one of its matters, has a slot of its own there (R1.6, migration 0006).
    Index(
        "uq_ratings_counted",
        "service_record_id",
        "visit_id",
        "overall",
        unique=True,
        sqlite_where=text("is_attempt = 0 AND is_follow_up = 0"),
        postgresql_where=text("NOT is_attempt AND NOT is_follow_up"),
    ),
)

invitations = Table(
    "invitations",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("service_record_id", Id, ForeignKey("service_records.id"), nullable=False, index=True),
    Column("channel", String(8), nullable=False),  # sms | email | voice
    Column("extension_code", String(8), nullable=True, index=True),  # SPEC R3.6 扩展码
    Column("token", String(64), nullable=True, unique=True),  # SPEC R3.9 e-mail reply token
    Column("status", String(16), nullable=False),  # scheduled sent reminded rated closed failed superseded
    Column("send_after", UTCDateTime(), nullable=False, index=True),
    Column("sent_at", UTCDateTime(), nullable=True),
    Column("reminder_after", UTCDateTime(), nullable=True),
    Column("reminded_at", UTCDateTime(), nullable=True),
    Column("closes_at", UTCDateTime(), nullable=True),  # default rating due (SPEC R3.4)
    Column("claimed_by", String(64), nullable=True),
    Column("claimed_until", UTCDateTime(), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    # When the scheduler next looks at it (send, remind, record the default); NULL when done.
    Column("next_step_at", UTCDateTime(), nullable=True, index=True),
    Column("clarified_at", UTCDateTime(), nullable=True),  # SPEC R3.5: one clarification only
    # One invitation per record and channel, also when two instances race to create it.
    Index("uq_invitations_record_channel", "service_record_id", "channel", unique=True),
)

messages = Table(
    "messages",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("invitation_id", Id, ForeignKey("invitations.id"), nullable=True, index=True),
    Column("direction", String(4), nullable=False),  # out | in
    Column("kind", String(16), nullable=False),  # invitation | reminder | reply | receipt | notice
    Column("phone_enc", LargeBinary, nullable=True),
    Column("phone_hash", String(64), nullable=True, index=True),
    Column("body", Text, nullable=False),
    Column("status", String(16), nullable=False),  # queued | submitted | delivered | failed | received
    Column("attempts", Integer, nullable=False, default=0),
    Column("smsc_ids", JSON, nullable=True),  # per part (SPEC R3.7)
    Column("error", Text, nullable=True),
    Column("send_after", UTCDateTime(), nullable=True, index=True),
    Column("claimed_by", String(64), nullable=True),
    Column("claimed_until", UTCDateTime(), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    # 0 = answers to citizens' replies, sent ahead of bulk invitations (SPEC R3.7a); 5 = bulk.
    Column("priority", SmallInteger, nullable=False, default=5, server_default="5"),
    Column("source_addr", String(21), nullable=True),  # service number + extension code (SPEC R3.6)
    Column("concat_ref", Integer, nullable=True),  # UDH reference of the current attempt (SPEC R3.1)
    Index("ix_messages_queue", "status", "priority", "id"),
)

# One row per part submitted and acknowledged by the SMSC (SPEC R3.7): the message-id mapping,
# written as the submit_sm_resp is handled and kept for receipts (at least 7 days).
message_parts = Table(
    "message_parts",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("message_id", Id, ForeignKey("messages.id"), nullable=False),
    Column("attempt", SmallInteger, nullable=False),
    Column("seq", SmallInteger, nullable=False),
    Column("total", SmallInteger, nullable=False),
    Column("smsc_id", String(64), nullable=False, index=True),  # normalised (gateway.sms.receipts)
    Column("smsc_id_raw", String(65), nullable=False),
    Column("status", String(12), nullable=False),  # submitted | delivered | failed
    Column("receipt_state", String(16), nullable=True),
    Column("error", String(16), nullable=True),
    Column("submitted_at", UTCDateTime(), nullable=False),
    Column("receipt_at", UTCDateTime(), nullable=True),
    Index("uq_message_parts_part", "message_id", "attempt", "seq", unique=True),
)

# Every deliver_sm, stored before it is acknowledged (SPEC R3.7a): reply parts until their
# message is whole, receipts until their part is known.
sms_inbox = Table(
    "sms_inbox",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("kind", String(8), nullable=False),  # reply | receipt
    Column("status", String(10), nullable=False),  # pending | done | unmatched | unreadable
    Column("phone_hash", String(64), nullable=True),
    Column("phone_enc", LargeBinary, nullable=True),
    Column("destination_addr", String(21), nullable=True),
    Column("dedupe_key", String(100), nullable=False),
    Column("concat_ref", Integer, nullable=True),
    Column("concat_total", SmallInteger, nullable=True),
    Column("concat_seq", SmallInteger, nullable=True),
    Column("body", Text, nullable=True),
    Column("smsc_id", String(64), nullable=True, index=True),
    Column("receipt_state", String(16), nullable=True),
    Column("error", String(16), nullable=True),
    Column("message_id", Id, ForeignKey("messages.id"), nullable=True),
    Column("received_at", UTCDateTime(), nullable=False),
    Index("ix_sms_inbox_sender", "phone_hash", "dedupe_key"),
    Index("ix_sms_inbox_status", "kind", "status"),
)

bad_rating_cases = Table(
    "bad_rating_cases",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("case_no", String(32), nullable=False, unique=True),
    Column("rating_id", Id, ForeignKey("ratings.id"), nullable=False, unique=True),
    Column("status", String(24), nullable=False),  # PLATFORM.md case statuses
    Column("version", Integer, nullable=False),
    Column("contact_due", UTCDateTime(), nullable=False),  # SPEC R4.2
    Column("rectify_due", UTCDateTime(), nullable=False),
    Column("feedback_due", UTCDateTime(), nullable=False),
    Column("note", Text, nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
)

opt_outs = Table(
    "opt_outs",
    metadata,
    Column("phone_hash", String(64), primary_key=True),  # SPEC R3.8, permanent
    Column("channel", String(8), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
)

outbox = Table(
    "outbox",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    # The platform's idempotency key (PLATFORM.md recordId): the same on every retry.
    Column("record_id", String(64), nullable=False, unique=True),
    Column("record_type", String(16), nullable=False),  # evaluation | case
    Column("rating_id", Id, ForeignKey("ratings.id"), nullable=True, index=True),
    Column("case_id", Id, ForeignKey("bad_rating_cases.id"), nullable=True),
    Column("status", String(12), nullable=False),  # pending | pushed | rejected
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", UTCDateTime(), nullable=False),
    Column("last_error", Text, nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("pushed_at", UTCDateTime(), nullable=True),
    # A pusher's lease on the row (SPEC R7.2): one instance pushes it at a time, and the claim of
    # an instance that died expires by itself.
    Column("claimed_by", String(64), nullable=True),
    Column("claimed_until", UTCDateTime(), nullable=True),
    # Why the platform refused the record as invalid; it is not retried unchanged (SPEC R7.2).
    Column("rejected_reason", Text, nullable=True),
    Column("pushed_batch_id", String(64), nullable=True),  # the batchId that the platform acknowledged
    # The record as it was when queued, for records the current rows cannot reproduce (an older
    # version of a bad-rating case); NULL: built from the current rows.
    Column("payload", JSON, nullable=True),
    Index("ix_outbox_due", "status", "next_attempt_at"),
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("at", UTCDateTime(), nullable=False, index=True),
    Column("actor", String(100), nullable=False),
    Column("action", String(50), nullable=False),
    Column("subject", String(200), nullable=True),
    Column("detail", JSON, nullable=True),
)

api_tokens = Table(
    "api_tokens",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("role", String(16), nullable=False),
    Column("name", String(100), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("revoked_at", UTCDateTime(), nullable=True),
)
