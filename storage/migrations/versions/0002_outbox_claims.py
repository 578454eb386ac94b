"""outbox claims: pusher leases, rejection reasons, acknowledged batch, record snapshots

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 15:11:12.201636

SPEC R7.2: several gateway instances share the outbox; a row is leased by one pusher at a
time (``claimed_by`` / ``claimed_until``, so that a crashed instance's claims expire), a record
the platform refuses keeps the reason, and a pushed record the batch that acknowledged it.
On SQLite every step is a plain ``ALTER TABLE``: no table is rebuilt.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import storage.schema

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.add_column(sa.Column("claimed_by", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("claimed_until", storage.schema.UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column("rejected_reason", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("pushed_batch_id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("payload", sa.JSON(), nullable=True))
        batch_op.create_index(batch_op.f("ix_outbox_rating_id"), ["rating_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_outbox_rating_id"))
        batch_op.drop_column("payload")
        batch_op.drop_column("pushed_batch_id")
        batch_op.drop_column("rejected_reason")
        batch_op.drop_column("claimed_until")
        batch_op.drop_column("claimed_by")
