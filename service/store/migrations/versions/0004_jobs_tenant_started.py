"""`ix_jobs_tenant_started`: the fair claim breaks a tie between tenants with as many jobs running by which was
served least recently (its latest `started_at`), read per waiting tenant from this index.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if "ix_jobs_tenant_started" not in {i["name"] for i in sa.inspect(op.get_bind()).get_indexes("jobs")}:
        op.create_index("ix_jobs_tenant_started", "jobs", ["tenant_id", "started_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_tenant_started", table_name="jobs")
