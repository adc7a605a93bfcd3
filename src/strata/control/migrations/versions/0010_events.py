"""The fleet's event feed (`strata events`, `GET /v1/events`).

Revision ID: 0010_events
Revises: 0009_replicas
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010_events"
down_revision: str | Sequence[str] | None = "0009_replicas"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create fleet_events."""
    op.create_table(
        "fleet_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.Double(), nullable=False),
        sa.Column("kind", sa.String(24), nullable=False),
        sa.Column("node_id", sa.String(32), nullable=True),
        sa.Column("model", sa.String(128), nullable=True),
        sa.Column("version", sa.String(128), nullable=True),
        sa.Column("rollout_id", sa.Integer(), nullable=True),
        sa.Column("message", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_fleet_events")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_fleet_events_at"), "fleet_events", ["at"])
    op.create_index(op.f("ix_fleet_events_kind"), "fleet_events", ["kind"])
    op.create_index(op.f("ix_fleet_events_node_id"), "fleet_events", ["node_id"])


def downgrade() -> None:
    """Drop it."""
    op.drop_table("fleet_events")
