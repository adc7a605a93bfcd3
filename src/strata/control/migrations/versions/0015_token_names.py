"""Operator tokens get a name, the time they were last used, and a revocation time (`strata token revoke`).

Revision ID: 0015_token_names
Revises: 0014_shed
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015_token_names"
down_revision: str | Sequence[str] | None = "0014_shed"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add api_tokens.name, last_used_at and revoked_at, empty in the rows already stored (those tokens had no
    name, their use was not recorded, and none was revoked)."""
    with op.batch_alter_table("api_tokens") as batch:
        batch.add_column(sa.Column("name", sa.String(64), nullable=True))
        batch.add_column(sa.Column("last_used_at", sa.Double(), nullable=True))
        batch.add_column(sa.Column("revoked_at", sa.Double(), nullable=True))


def downgrade() -> None:
    """Drop them, and with them the revoked tokens (an older server would accept them again)."""
    api_tokens = sa.table("api_tokens", sa.column("revoked_at", sa.Double()))
    op.execute(api_tokens.delete().where(api_tokens.c.revoked_at.is_not(None)))
    with op.batch_alter_table("api_tokens") as batch:
        batch.drop_column("revoked_at")
        batch.drop_column("last_used_at")
        batch.drop_column("name")
