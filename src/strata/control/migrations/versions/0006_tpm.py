"""TPM attestation: a node's registered attestation key, its endorsement key's fingerprint, its last PCRs.

Revision ID: 0006_tpm
Revises: 0005_supply
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_tpm"
down_revision: str | Sequence[str] | None = "0005_supply"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the TPM columns to nodes (one endorsement key, one node)."""
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("tpm_ak", sa.Text(), nullable=True))
        batch.add_column(sa.Column("tpm_ek", sa.String(64), nullable=True))
        batch.add_column(sa.Column("tpm_pcrs", sa.JSON(), nullable=True))
        batch.create_unique_constraint(op.f("uq_nodes_tpm_ek"), ["tpm_ek"])


def downgrade() -> None:
    """Drop them."""
    with op.batch_alter_table("nodes") as batch:
        batch.drop_constraint(op.f("uq_nodes_tpm_ek"), type_="unique")
        batch.drop_column("tpm_pcrs")
        batch.drop_column("tpm_ek")
        batch.drop_column("tpm_ak")
