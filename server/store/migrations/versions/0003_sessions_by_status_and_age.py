"""Retention finds stopped sessions by age: test_sessions gets (status, updated_at), which replaces (status).

Additive for older nodes (they never name an index); the composite index serves every query
the single-column one did, since `status` leads it.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_test_sessions_status_updated_at", "test_sessions", ["status", "updated_at"])
    op.drop_index("ix_test_sessions_status", table_name="test_sessions")


def downgrade() -> None:
    op.create_index("ix_test_sessions_status", "test_sessions", ["status"])
    op.drop_index("ix_test_sessions_status_updated_at", table_name="test_sessions")
