"""Telemetry minutes count the failed requests refused as the caller's fault apart (`client_errors`).

Revision ID: 0012_client_errors
Revises: 0011_node_logs
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012_client_errors"
down_revision: str | Sequence[str] | None = "0011_node_logs"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add telemetry_minutes.client_errors, 0 in the rows already stored (their nodes told no errors apart)."""
    with op.batch_alter_table("telemetry_minutes") as batch:
        batch.add_column(sa.Column("client_errors", sa.BigInteger(), server_default="0", nullable=False))


def downgrade() -> None:
    """Drop it."""
    with op.batch_alter_table("telemetry_minutes") as batch:
        batch.drop_column("client_errors")
