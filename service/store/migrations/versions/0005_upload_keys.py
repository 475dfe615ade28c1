"""`upload_keys`: the Idempotency-Key of an upload that queued no job (`analyze=false`) with its request digest
and slide, so that the key reused with another request is refused (422) instead of storing that one too.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table("upload_keys"):
        return
    op.create_table(
        "upload_keys",
        sa.Column("tenant_id", sa.String(32), sa.ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("idempotency_key", sa.String(255), primary_key=True),
        sa.Column("request_sha256", sa.String(64), nullable=False),
        sa.Column("slide_id", sa.String(32), sa.ForeignKey("slides.id", ondelete="CASCADE"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_upload_keys_slide_id", "upload_keys", ["slide_id"])


def downgrade() -> None:
    op.drop_index("ix_upload_keys_slide_id", table_name="upload_keys")
    op.drop_table("upload_keys")
