"""Durable records: tenants, API keys, slides, jobs and results. One schema for SQLite and PostgreSQL.

Ids are random UUID4 hex strings, so knowing one id tells nothing about any other (BOLA), and every
row carries its tenant so each query can be scoped.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

JOB_STATES = ("queued", "running", "succeeded", "failed", "canceled")
TERMINAL_STATES = ("succeeded", "failed", "canceled")


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar = {datetime: DateTime(timezone=True), dict: JSON}


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """Only a SHA-256 of the secret is kept; `prefix` is the public half that finds the row."""

    __tablename__ = "api_keys"
    prefix: Mapped[str] = mapped_column(String(16), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class Slide(Base):
    __tablename__ = "slides"
    __table_args__ = (
        UniqueConstraint("tenant_id", "sha256", name="uq_slide_tenant_sha"),
        Index("ix_slides_tenant_created", "tenant_id", "created_at"),
    )
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    sha256: Mapped[str] = mapped_column(String(64))
    format: Mapped[str] = mapped_column(String(16))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    blob_key: Mapped[str] = mapped_column(String(255))
    mpp_override: Mapped[float | None] = mapped_column(Float, nullable=True)
    info: Mapped[dict] = mapped_column(JSON, default=dict)  # SlideReader.describe(): no PHI
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class UploadKey(Base):
    """An Idempotency-Key of an upload that queued no job (`analyze=false`), with its request digest: jobs keep
    their own keys, so without this a key reused with another file stored it as well."""

    __tablename__ = "upload_keys"
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_sha256: Mapped[str] = mapped_column(String(64))
    slide_id: Mapped[str] = mapped_column(ForeignKey("slides.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_job_tenant_idem"),
        Index("ix_jobs_state_created", "state", "created_at"),
        Index("ix_jobs_tenant_created", "tenant_id", "created_at"),
        Index("ix_jobs_tenant_started", "tenant_id", "started_at"),  # the fair claim's tie-break
    )
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    slide_id: Mapped[str] = mapped_column(ForeignKey("slides.id", ondelete="CASCADE"), index=True)
    state: Mapped[str] = mapped_column(String(16), default="queued")
    stage: Mapped[str | None] = mapped_column(String(32), nullable=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    options: Mapped[dict] = mapped_column(JSON, default=dict)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    # what was asked (slide, options, webhook) when the key was given: the same key with another request is refused
    request_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    webhook_url: Mapped[str | None] = mapped_column(String(2048), nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    worker: Mapped[str | None] = mapped_column(String(128), nullable=True)
    stage_seconds: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(nullable=True)
    # Celery mode: when the job id was last handed to the broker (NULL = never: re-published at gateway start)
    published_at: Mapped[datetime | None] = mapped_column(nullable=True)
    # set by whoever claims the terminal webhook (a conditional UPDATE): one sender at a time per job
    webhook_claimed_at: Mapped[datetime | None] = mapped_column(nullable=True)
    # set when that sender finished: NULL long after the claim means it died, and the claim may be taken again
    webhook_sent_at: Mapped[datetime | None] = mapped_column(nullable=True)
    webhook_delivered: Mapped[bool | None] = mapped_column(Boolean, nullable=True)  # a 2xx, or gave up
    # "interactive" (uploads, API) or "batch": which Celery queue's tokens may claim it (NULL = interactive)
    queue: Mapped[str | None] = mapped_column(String(16), nullable=True)
    # the broker message (Celery task id) whose delivery claimed this attempt: a redelivery finds its job again
    claim_token: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # slide + bundle + options digest: an identical finished job's result is reused instead of recomputed
    cache_key: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    # an identical job already queued or running: this one waits for it and takes its result (NULL = runs itself)
    follows: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    # the OpenTelemetry trace the job was created under (32 hex digits; NULL when tracing is off)
    trace_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # its W3C traceparent (the submitting span): the embedded pool's worker processes continue the trace from it
    trace_parent: Mapped[str | None] = mapped_column(String(55), nullable=True)


class Result(Base):
    """What a succeeded job produced: blob keys with sizes and checksums, so downloads can be verified."""

    __tablename__ = "results"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    files: Mapped[dict] = mapped_column(JSON, default=dict)  # name -> {"key", "size", "sha256"}
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditEvent(Base):
    """Who did what to which resource, when, from where. Append-only: no code path updates or deletes a row, and
    the migration installs triggers that refuse it. Holds ids only, never file names or slide metadata."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_tenant_at", "tenant_id", "at"), Index("ix_audit_at", "at"))
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    tenant_id: Mapped[str | None] = mapped_column(String(32), nullable=True)  # NULL: the caller was not identified
    key_prefix: Mapped[str | None] = mapped_column(String(16), nullable=True)  # the key's public half
    action: Mapped[str] = mapped_column(String(16))  # create | read | download | cancel | delete
    resource: Mapped[str] = mapped_column(String(16))  # slide | job | batch | audit ...
    resource_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    method: Mapped[str] = mapped_column(String(8))
    route: Mapped[str] = mapped_column(String(128))  # the route template, e.g. /jobs/{job_id}/result
    status: Mapped[int] = mapped_column(Integer)
    client: Mapped[str | None] = mapped_column(String(64), nullable=True)  # the peer address
    request_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
