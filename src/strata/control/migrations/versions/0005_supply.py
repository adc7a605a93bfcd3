"""Supply chain: a variant's release signature, and the TUF metadata of the image and director repositories.

Revision ID: 0005_supply
Revises: 0004_attestation
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_supply"
down_revision: str | Sequence[str] | None = "0004_attestation"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_NAME = 128


def upgrade() -> None:
    """Add `variants.signature` and the `tuf_metadata` table."""
    with op.batch_alter_table("variants") as batch:
        batch.add_column(sa.Column("signature", sa.String(64), nullable=True))
    op.create_table(
        "tuf_metadata",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("repo", sa.String(48), nullable=False),
        sa.Column("role", sa.String(3 * _NAME + 2), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("expires_at", sa.Double(), nullable=False),
        sa.Column("source", sa.String(80), nullable=True),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tuf_metadata")),
        sa.UniqueConstraint("repo", "role", "version", name=op.f("uq_tuf_metadata_repo_role_version")),
    )


def downgrade() -> None:
    """Drop what `upgrade` added."""
    op.drop_table("tuf_metadata")
    with op.batch_alter_table("variants") as batch:
        batch.drop_column("signature")
