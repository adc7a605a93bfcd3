"""What several server processes on one database share: the fleet change counter, leases, pending challenges.

Revision ID: 0009_replicas
Revises: 0008_certificates
Create Date: 2026-12-15
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_replicas"
down_revision: str | Sequence[str] | None = "0008_certificates"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create fleet_changes (with its one row), leases and attestation_challenges."""
    changes = op.create_table(
        "fleet_changes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_fleet_changes")),
    )
    op.bulk_insert(changes, [{"id": 1, "generation": 0}])
    op.create_table(
        "leases",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("holder", sa.String(128), nullable=False),
        sa.Column("expires_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_leases")),
    )
    op.create_table(
        "attestation_challenges",
        sa.Column("node_id", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("expires_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("node_id", "kind", name=op.f("pk_attestation_challenges")),
    )


def downgrade() -> None:
    """Drop them."""
    op.drop_table("attestation_challenges")
    op.drop_table("leases")
    op.drop_table("fleet_changes")
