"""A rollout node kept out because it refused the version itself says so in a column (`rollout_nodes.refused`),
no longer only in the words of its exclusion.

Revision ID: 0013_rollout_refused
Revises: 0012_client_errors
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013_rollout_refused"
down_revision: str | Sequence[str] | None = "0012_client_errors"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# How the planner worded a refusing node's exclusion before the column (rows stored then carry it): fixed here,
# whatever the planner says now.
_REFUSED_TEXT = "the node refused it: "


def upgrade() -> None:
    """Add rollout_nodes.refused, true in the rows already stored whose exclusion begins with the old words."""
    with op.batch_alter_table("rollout_nodes") as batch:
        batch.add_column(sa.Column("refused", sa.Boolean(), server_default=sa.false(), nullable=False))
    nodes = sa.table("rollout_nodes", sa.column("excluded", sa.Text()), sa.column("refused", sa.Boolean()))
    op.execute(nodes.update().where(nodes.c.excluded.startswith(_REFUSED_TEXT, autoescape=True)).values(refused=True))


def downgrade() -> None:
    """Drop it (the exclusion's words still say it)."""
    with op.batch_alter_table("rollout_nodes") as batch:
        batch.drop_column("refused")
