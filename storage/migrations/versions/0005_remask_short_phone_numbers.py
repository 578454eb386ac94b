"""re-mask short phone numbers: at least four digits hidden (SPEC R5.1)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24 05:10:00

``mobile_masked`` is worked out when a record is written. Up to this revision a number of 8
to 10 digits (a land line, with or without its area code) kept the first three and the last
four digits, so ``87654321`` read ``876*4321``. ``gateway.privacy.mask_phone`` now hides at
least four digits. The stronger mask is derived from the stored one (it only hides more), so
no key is needed; a downgrade cannot show again what is hidden and leaves the values as they are.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def remask(masked: str) -> str:
    """This revision's rule (a migration keeps its own copy): at least four hidden, the last four shown."""
    if len(masked) <= 7:
        return masked
    hidden = max(4, len(masked) - 7)
    shown = len(masked) - 4 - hidden
    return masked[:shown] + "*" * hidden + masked[-4:]


def upgrade() -> None:
    records = sa.table("service_records", sa.column("id", sa.BigInteger), sa.column("mobile_masked", sa.String))
    connection = op.get_bind()
    rows = connection.execute(
        sa.select(records.c.id, records.c.mobile_masked).where(sa.func.length(records.c.mobile_masked).between(8, 10))
    ).all()
    changed = [{"row_id": row_id, "masked": remask(masked)} for row_id, masked in rows if remask(masked) != masked]
    if changed:
        connection.execute(
            records.update().where(records.c.id == sa.bindparam("row_id")).values(mobile_masked=sa.bindparam("masked")),
            changed,
        )


def downgrade() -> None:
    pass  # what is hidden cannot be shown again
