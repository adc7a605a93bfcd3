"""Telemetry minutes count the failed requests shed by admission control apart (`shed`).

Revision ID: 0014_shed
Revises: 0013_rollout_refused
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014_shed"
down_revision: str | Sequence[str] | None = "0013_rollout_refused"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add telemetry_minutes.shed, 0 in the rows already stored (their nodes told no shed requests apart)."""
    with op.batch_alter_table("telemetry_minutes") as batch:
        batch.add_column(sa.Column("shed", sa.BigInteger(), server_default="0", nullable=False))


def downgrade() -> None:
    """Drop it."""
    with op.batch_alter_table("telemetry_minutes") as batch:
        batch.drop_column("shed")
