"""a theme's overall rating has a slot of its own on the matter that keeps it (SPEC R1.6)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24 06:40:00

A theme's (主题式"一件事") overall rating is kept on one matter of the theme, flagged
``overall``. ``uq_ratings_counted`` allowed one counted rating per record and visit, so the
overall rating took that matter's own slot, and a later rating of that matter alone was kept
as an attempt, although it takes precedence over the overall rating for that matter (R1.6).
The index now has ``overall`` as a third column: one counted own rating and one counted
overall rating per record and visit.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

WHERE = {
    "sqlite_where": sa.text("is_attempt = 0 AND is_follow_up = 0"),
    "postgresql_where": sa.text("NOT is_attempt AND NOT is_follow_up"),
}


def upgrade() -> None:
    op.drop_index("uq_ratings_counted", table_name="ratings")
    op.create_index("uq_ratings_counted", "ratings", ["service_record_id", "visit_id", "overall"], unique=True, **WHERE)


def downgrade() -> None:
    """Back to one slot per record and visit; fails if a matter has both an own and an overall rating."""
    op.drop_index("uq_ratings_counted", table_name="ratings")
    op.create_index("uq_ratings_counted", "ratings", ["service_record_id", "visit_id"], unique=True, **WHERE)
