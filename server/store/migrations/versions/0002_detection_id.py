"""Idempotent publish: detections.id, unique per session where given (PROTOCOL.md 1.1).

Additive: the column is nullable and older nodes never write it, so they keep working on the
migrated database during a rolling restart.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("detections", sa.Column("id", sa.String(64), nullable=True))
    # NULLs are distinct in a unique index on both databases: only given ids are held unique.
    op.create_index("uq_detections_session_id_id", "detections", ["session_id", "id"], unique=True)


def downgrade() -> None:
    op.drop_index("uq_detections_session_id_id", table_name="detections")
    with op.batch_alter_table("detections") as batch:
        batch.drop_column("id")
