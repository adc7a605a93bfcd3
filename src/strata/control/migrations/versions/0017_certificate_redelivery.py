"""Node certificates keep their PEM and the time they were issued, so that a renewal whose answer was lost can be
answered again (`FleetService.renew_certificate`): the node, still holding the certificate that renewal replaced,
would otherwise be locked out until enrolled again.

Revision ID: 0017_certificate_redelivery
Revises: 0016_telemetry_time_indexes
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017_certificate_redelivery"
down_revision: str | Sequence[str] | None = "0016_telemetry_time_indexes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add node_certificates.pem and issued_at, empty in the rows already stored (their renewals' answers cannot be
    given again: those nodes are where they were before)."""
    with op.batch_alter_table("node_certificates") as batch:
        batch.add_column(sa.Column("pem", sa.Text(), nullable=True))
        batch.add_column(sa.Column("issued_at", sa.Double(), nullable=True))


def downgrade() -> None:
    """Drop them."""
    with op.batch_alter_table("node_certificates") as batch:
        batch.drop_column("issued_at")
        batch.drop_column("pem")
