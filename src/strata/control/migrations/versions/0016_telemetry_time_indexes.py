"""Telemetry: an index on each time column the retention sweep deletes by (minutes, events, drift counts, batch
records), so that a sweep reads the expired rows and not every table whole.

Revision ID: 0016_telemetry_time_indexes
Revises: 0015_token_names
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0016_telemetry_time_indexes"
down_revision: str | Sequence[str] | None = "0015_token_names"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (table, column): what `TelemetryService.sweep` deletes by
_INDEXES = (
    ("telemetry_minutes", "minute"),
    ("telemetry_events", "ts"),
    ("telemetry_drift", "minute"),
    ("telemetry_batches", "received_at"),
)


def upgrade() -> None:
    """Create the indexes (a large table takes a while: the migration runs before the server serves)."""
    for table, column in _INDEXES:
        op.create_index(op.f(f"ix_{table}_{column}"), table, [column])


def downgrade() -> None:
    """Drop them."""
    for table, column in _INDEXES:
        op.drop_index(op.f(f"ix_{table}_{column}"), table_name=table)
