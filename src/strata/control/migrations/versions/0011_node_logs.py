"""Log tails fetched from nodes on demand (`strata nodes logs`).

Revision ID: 0011_node_logs
Revises: 0010_events
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011_node_logs"
down_revision: str | Sequence[str] | None = "0010_events"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create node_log_requests."""
    op.create_table(
        "node_log_requests",
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("node_id", sa.String(32), nullable=False),
        sa.Column("lines", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("answered_at", sa.Double(), nullable=True),
        sa.Column("text", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["node_id"], ["nodes.id"], name=op.f("fk_node_log_requests_node_id_nodes")),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_node_log_requests")),
        sa.UniqueConstraint("id", name=op.f("uq_node_log_requests_id")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_node_log_requests_node_id"), "node_log_requests", ["node_id"])
    op.create_index(op.f("ix_node_log_requests_answered_at"), "node_log_requests", ["answered_at"])


def downgrade() -> None:
    """Drop it."""
    op.drop_table("node_log_requests")
