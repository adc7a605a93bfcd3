"""The certificates issued to nodes, until they expire, and which of them are revoked.

Revision ID: 0008_certificates
Revises: 0007_assigned
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_certificates"
down_revision: str | Sequence[str] | None = "0007_assigned"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create the node_certificates table."""
    op.create_table(
        "node_certificates",
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("node_id", sa.String(32), nullable=False),
        sa.Column("not_after", sa.Double(), nullable=False),
        sa.Column("revoked_at", sa.Double(), nullable=True),
        sa.ForeignKeyConstraint(["node_id"], ["nodes.id"], name=op.f("fk_node_certificates_node_id_nodes")),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_node_certificates")),
    )
    op.create_index(op.f("ix_node_certificates_node_id"), "node_certificates", ["node_id"])
    op.create_index(op.f("ix_node_certificates_not_after"), "node_certificates", ["not_after"])


def downgrade() -> None:
    """Drop it."""
    op.drop_index(op.f("ix_node_certificates_not_after"), table_name="node_certificates")
    op.drop_index(op.f("ix_node_certificates_node_id"), table_name="node_certificates")
    op.drop_table("node_certificates")
