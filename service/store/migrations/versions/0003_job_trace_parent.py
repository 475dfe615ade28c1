"""`jobs.trace_parent`: the W3C traceparent a job was submitted under, so that the embedded pool's worker
processes (which get no Celery message headers) start the job span as a child of the submitting request's span.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("trace_parent", sa.String(55), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "trace_parent")
