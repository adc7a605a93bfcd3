"""Node attestation: the level a node's last signed report earned, when, and why.

Revision ID: 0004_attestation
Revises: 0003
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_attestation"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the attestation columns to nodes."""
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("attestation", sa.String(16), nullable=True))
        batch.add_column(sa.Column("attested_at", sa.Double(), nullable=True))
        batch.add_column(sa.Column("attestation_detail", sa.Text(), nullable=True))


def downgrade() -> None:
    """Drop them."""
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("attestation_detail")
        batch.drop_column("attested_at")
        batch.drop_column("attestation")
