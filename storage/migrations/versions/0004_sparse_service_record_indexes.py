"""sparse service record indexes: the look-up columns index only the rows that have them

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24 02:40:00

Each look-up column of ``service_records`` (mobile and e-mail hashes, matter, department,
agent, work order, batch, theme, call and linked ids) had a full index, so every new record
wrote a page to each of them, NULLs included: a hotline call's record has no e-mail,
department, batch or theme. The indexes are rebuilt with ``WHERE column IS NOT NULL``
(``storage.schema.sparse_index``); their names and the queries that use them do not change.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

#: As ``storage.schema.SERVICE_RECORD_LOOKUPS`` at this revision (a migration keeps its own copy).
COLUMNS = (
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


def upgrade() -> None:
    for column in COLUMNS:
        name = f"ix_service_records_{column}"
        where = sa.text(f"{column} IS NOT NULL")
        op.drop_index(name, table_name="service_records")
        op.create_index(name, "service_records", [column], sqlite_where=where, postgresql_where=where)


def downgrade() -> None:
    for column in COLUMNS:
        name = f"ix_service_records_{column}"
        op.drop_index(name, table_name="service_records")
        op.create_index(name, "service_records", [column])
