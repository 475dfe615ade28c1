"""Baseline: the job database as it stood when migrations began (tenants, keys, slides, jobs, results, batches).

A fresh database gets every table. A database created before migrations (by `create_all` plus the old
add-missing-columns step) keeps its tables and rows and gets the nullable columns it lacks, with the same
back-fills the old step made, so an upgrade never re-sends the webhook of a job that ended long ago.

Revision ID: 0001
Revises:
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_meta = sa.MetaData()
_TS = sa.DateTime(timezone=True)

sa.Table(
    "tenants",
    _meta,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", _TS, nullable=False),
)
sa.Table(
    "api_keys",
    _meta,
    sa.Column("prefix", sa.String(16), primary_key=True),
    sa.Column("tenant_id", sa.String(32), sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("secret_sha256", sa.String(64), nullable=False),
    sa.Column("admin", sa.Boolean(), nullable=False),
    sa.Column("created_at", _TS, nullable=False),
    sa.Column("revoked", sa.Boolean(), nullable=False),
)
sa.Table(
    "slides",
    _meta,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("tenant_id", sa.String(32), sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("format", sa.String(16), nullable=False),
    sa.Column("size_bytes", sa.BigInteger(), nullable=False),
    sa.Column("blob_key", sa.String(255), nullable=False),
    sa.Column("mpp_override", sa.Float(), nullable=True),
    sa.Column("info", sa.JSON(), nullable=False),
    sa.Column("created_at", _TS, nullable=False),
    sa.UniqueConstraint("tenant_id", "sha256", name="uq_slide_tenant_sha"),
    sa.Index("ix_slides_tenant_created", "tenant_id", "created_at"),
)
sa.Table(
    "jobs",
    _meta,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("tenant_id", sa.String(32), sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    sa.Column("slide_id", sa.String(32), sa.ForeignKey("slides.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("stage", sa.String(32), nullable=True),
    sa.Column("progress", sa.Float(), nullable=False),
    sa.Column("error_code", sa.String(64), nullable=True),
    sa.Column("error_message", sa.Text(), nullable=True),
    sa.Column("attempts", sa.Integer(), nullable=False),
    sa.Column("options", sa.JSON(), nullable=False),
    sa.Column("idempotency_key", sa.String(255), nullable=True),
    sa.Column("request_sha256", sa.String(64), nullable=True),
    sa.Column("webhook_url", sa.String(2048), nullable=True),
    sa.Column("cancel_requested", sa.Boolean(), nullable=False),
    sa.Column("worker", sa.String(128), nullable=True),
    sa.Column("stage_seconds", sa.JSON(), nullable=False),
    sa.Column("created_at", _TS, nullable=False),
    sa.Column("started_at", _TS, nullable=True),
    sa.Column("finished_at", _TS, nullable=True),
    sa.Column("heartbeat_at", _TS, nullable=True),
    sa.Column("published_at", _TS, nullable=True),
    sa.Column("webhook_claimed_at", _TS, nullable=True),
    sa.Column("webhook_sent_at", _TS, nullable=True),
    sa.Column("webhook_delivered", sa.Boolean(), nullable=True),
    sa.Column("queue", sa.String(16), nullable=True),
    sa.Column("claim_token", sa.String(64), nullable=True),
    sa.Column("cache_key", sa.String(64), nullable=True, index=True),
    sa.Column("follows", sa.String(32), nullable=True, index=True),
    sa.UniqueConstraint("tenant_id", "idempotency_key", name="uq_job_tenant_idem"),
    sa.Index("ix_jobs_state_created", "state", "created_at"),
    sa.Index("ix_jobs_tenant_created", "tenant_id", "created_at"),
)
sa.Table(
    "results",
    _meta,
    sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("tenant_id", sa.String(32), sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("files", sa.JSON(), nullable=False),
    sa.Column("created_at", _TS, nullable=False),
)
sa.Table(
    "batches",
    _meta,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("tenant_id", sa.String(32), sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("options", sa.JSON(), nullable=False),
    sa.Column("created_at", _TS, nullable=False),
    sa.Column("submitted_at", _TS, nullable=False),
)
sa.Table(
    "batch_items",
    _meta,
    sa.Column("batch_id", sa.String(32), sa.ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("idx", sa.Integer(), primary_key=True),
    sa.Column("source", sa.Text(), nullable=False),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("slide_id", sa.String(32), sa.ForeignKey("slides.id", ondelete="SET NULL"), nullable=True),
    sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True),
    sa.Column("meta", sa.JSON(), nullable=False),
    sa.Column("error_code", sa.String(64), nullable=True),
    sa.Column("error_message", sa.Text(), nullable=True),
)

#: columns added to a pre-migration table, and the UPDATE that makes their old rows right
_BACKFILL = {
    ("jobs", "webhook_claimed_at"): "UPDATE jobs SET webhook_claimed_at = finished_at",  # old rows were reported
    ("jobs", "webhook_sent_at"): "UPDATE jobs SET webhook_sent_at = webhook_claimed_at",  # by senders that finished
}


def upgrade() -> None:
    bind = op.get_bind()
    insp = sa.inspect(bind)
    for table in _meta.sorted_tables:
        if not insp.has_table(table.name):
            table.create(bind)
            continue
        have = {c["name"] for c in insp.get_columns(table.name)}
        for col in table.columns:
            if col.name in have:
                continue
            if not col.nullable:
                raise RuntimeError(f"{table.name}.{col.name} is missing and cannot be added to existing rows")
            op.add_column(table.name, sa.Column(col.name, col.type, nullable=True))
            if (table.name, col.name) in _BACKFILL:
                op.execute(_BACKFILL[(table.name, col.name)])


def downgrade() -> None:
    bind = op.get_bind()
    for table in reversed(_meta.sorted_tables):
        table.drop(bind, checkfirst=True)
