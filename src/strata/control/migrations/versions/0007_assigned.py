"""Operator-assigned identity: what an enrollment token binds (name, tier, labels, or re-enrolling one node).

Revision ID: 0007_assigned
Revises: 0006_tpm
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_assigned"
down_revision: str | Sequence[str] | None = "0006_tpm"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the token bindings to enrollment_tokens."""
    with op.batch_alter_table("enrollment_tokens") as batch:
        batch.add_column(sa.Column("node_name", sa.String(128), nullable=True))
        batch.add_column(sa.Column("tier", sa.String(16), nullable=True))
        batch.add_column(sa.Column("labels", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("reenroll_node_id", sa.String(32), nullable=True))


def downgrade() -> None:
    """Drop them."""
    with op.batch_alter_table("enrollment_tokens") as batch:
        batch.drop_column("reenroll_node_id")
        batch.drop_column("labels")
        batch.drop_column("tier")
        batch.drop_column("node_name")
