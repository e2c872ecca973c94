"""link.banked_at: the emulated link's production clock, shared by every kme process

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("link") as batch_op:
        batch_op.add_column(sa.Column("banked_at", sa.Double(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("link") as batch_op:
        batch_op.drop_column("banked_at")
