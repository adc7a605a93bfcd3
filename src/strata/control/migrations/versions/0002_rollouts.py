"""Rollouts and their per-node assignments, pins, and the activation history of models.

Revision ID: 0002_rollouts
Revises: 0001
Create Date: 2025-02-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_rollouts"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _time(name: str, nullable: bool = False) -> sa.Column[float]:
    return sa.Column(name, sa.Double(), nullable=nullable)


def upgrade() -> None:
    """Create the rollout, pin and history tables."""
    op.create_table(
        "rollouts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("selector", sa.JSON(), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=False),
        _time("wave_started_at", nullable=True),
        sa.Column("gate_results", sa.JSON(), nullable=False),
        sa.Column("failed_gate", sa.JSON(), nullable=True),
        sa.Column("baseline", sa.JSON(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        _time("created_at"),
        _time("finished_at", nullable=True),
        sa.ForeignKeyConstraint(
            ["version_id"], ["model_versions.id"], name=op.f("fk_rollouts_version_id_model_versions")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rollouts")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_rollouts_version_id"), "rollouts", ["version_id"])
    op.create_index(op.f("ix_rollouts_status"), "rollouts", ["status"])
    op.create_table(
        "rollout_nodes",
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.String(32), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=True),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("previous_version", sa.String(128), nullable=True),
        sa.Column("excluded", sa.Text(), nullable=True),
        _time("released_at", nullable=True),
        _time("healthy_at", nullable=True),
        _time("failed_at", nullable=True),
        sa.Column("failure", sa.Text(), nullable=True),
        sa.Column("ever_on_target", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollouts.id"], name=op.f("fk_rollout_nodes_rollout_id_rollouts")),
        sa.ForeignKeyConstraint(["node_id"], ["nodes.id"], name=op.f("fk_rollout_nodes_node_id_nodes")),
        sa.PrimaryKeyConstraint("rollout_id", "node_id", name=op.f("pk_rollout_nodes")),
    )
    op.create_index(op.f("ix_rollout_nodes_node_id"), "rollout_nodes", ["node_id"])
    op.create_table(
        "pins",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.String(32), nullable=True),
        sa.Column("selector", sa.JSON(), nullable=False),
        _time("created_at"),
        sa.ForeignKeyConstraint(["version_id"], ["model_versions.id"], name=op.f("fk_pins_version_id_model_versions")),
        sa.ForeignKeyConstraint(["node_id"], ["nodes.id"], name=op.f("fk_pins_node_id_nodes")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pins")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_pins_version_id"), "pins", ["version_id"])
    op.create_table(
        "activation_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.String(32), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("version", sa.String(128), nullable=True),
        sa.Column("variant", sa.String(128), nullable=True),
        sa.Column("digest", sa.String(71), nullable=True),
        sa.Column("previous_version", sa.String(128), nullable=True),
        _time("activated_at", nullable=True),
        _time("at"),
        sa.ForeignKeyConstraint(["node_id"], ["nodes.id"], name=op.f("fk_activation_events_node_id_nodes")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_activation_events")),
    )
    op.create_index(op.f("ix_activation_events_node_id"), "activation_events", ["node_id"])
    op.create_index(op.f("ix_activation_events_model"), "activation_events", ["model"])


def downgrade() -> None:
    """Drop the tables this revision created, children first."""
    for table in ("activation_events", "pins", "rollout_nodes", "rollouts"):
        op.drop_table(table)
