"""Telemetry: uploaded batches (exactly once), per-minute aggregates, kept events, drift counts, drops.

Revision ID: 0003
Revises: 0002_rollouts
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002_rollouts"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_NAME = 128


def _node_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(["node_id"], ["nodes.id"], name=op.f(f"fk_{table}_node_id_nodes"))


def upgrade() -> None:
    """Create the telemetry tables."""
    op.create_table(
        "telemetry_batches",
        sa.Column("node_id", sa.String(32), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("received_at", sa.Double(), nullable=False),
        sa.Column("bytes", sa.Integer(), nullable=False),
        sa.Column("minutes", sa.Integer(), nullable=False),
        sa.Column("events", sa.Integer(), nullable=False),
        _node_fk("telemetry_batches"),
        sa.PrimaryKeyConstraint("node_id", "seq", name=op.f("pk_telemetry_batches")),
    )
    op.create_table(
        "telemetry_minutes",
        sa.Column("node_id", sa.String(32), nullable=False),
        sa.Column("model", sa.String(_NAME), nullable=False),
        sa.Column("version", sa.String(_NAME), nullable=False),
        sa.Column("variant", sa.String(_NAME), nullable=False),
        sa.Column("minute", sa.BigInteger(), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("items", sa.BigInteger(), nullable=False),
        sa.Column("latency_sum_us", sa.BigInteger(), nullable=False),
        sa.Column("queue_sum_us", sa.BigInteger(), nullable=False),
        sa.Column("latency", sa.JSON(), nullable=False),
        _node_fk("telemetry_minutes"),
        sa.PrimaryKeyConstraint("node_id", "model", "version", "variant", "minute", name=op.f("pk_telemetry_minutes")),
    )
    op.create_index("ix_telemetry_minutes_model_minute", "telemetry_minutes", ["model", "minute"])
    op.create_table(
        "telemetry_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.String(32), nullable=False),
        sa.Column("ts", sa.Double(), nullable=False),
        sa.Column("model", sa.String(_NAME), nullable=False),
        sa.Column("version", sa.String(_NAME), nullable=False),
        sa.Column("variant", sa.String(_NAME), nullable=False),
        sa.Column("latency_us", sa.BigInteger(), nullable=False),
        sa.Column("queue_us", sa.BigInteger(), nullable=False),
        sa.Column("batch", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("tier", sa.String(16), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("summary", sa.Text(), nullable=False),
        _node_fk("telemetry_events"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_telemetry_events")),
    )
    op.create_index("ix_telemetry_events_model_ts", "telemetry_events", ["model", "ts"])
    op.create_index(op.f("ix_telemetry_events_node_id"), "telemetry_events", ["node_id"])
    op.create_table(
        "telemetry_drift",
        sa.Column("node_id", sa.String(32), nullable=False),
        sa.Column("model", sa.String(_NAME), nullable=False),
        sa.Column("version", sa.String(_NAME), nullable=False),
        sa.Column("minute", sa.BigInteger(), nullable=False),
        sa.Column("tensor", sa.String(256), nullable=False),
        sa.Column("counts", sa.JSON(), nullable=False),
        _node_fk("telemetry_drift"),
        sa.PrimaryKeyConstraint("node_id", "model", "version", "minute", "tensor", name=op.f("pk_telemetry_drift")),
    )
    op.create_table(
        "telemetry_dropped",
        sa.Column("node_id", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        _node_fk("telemetry_dropped"),
        sa.PrimaryKeyConstraint("node_id", "kind", name=op.f("pk_telemetry_dropped")),
    )


def downgrade() -> None:
    """Drop the telemetry tables."""
    op.drop_index(op.f("ix_telemetry_events_node_id"), table_name="telemetry_events")
    op.drop_index("ix_telemetry_events_model_ts", table_name="telemetry_events")
    op.drop_index("ix_telemetry_minutes_model_minute", table_name="telemetry_minutes")
    for table in ("telemetry_dropped", "telemetry_drift", "telemetry_events", "telemetry_minutes", "telemetry_batches"):
        op.drop_table(table)
