"""Repository functions: every read of a tenant's object takes the tenant id, so scoping is not optional.

Job claiming is a conditional UPDATE (`... WHERE id = ? AND state = 'queued'`) checked by row count: it is
atomic on SQLite and PostgreSQL alike, so several runners (or Celery workers) never start the same job twice.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service.errors import IdempotencyConflictError, QuotaExceededError
from service.slides import formats
from service.store.blobs import BlobStore
from service.store.db import transaction
from service.store.models import (
    JOB_STATES,
    TERMINAL_STATES,
    ApiKey,
    Job,
    Result,
    Slide,
    Tenant,
    new_id,
    utcnow,
)

_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_TOKEN_RE = re.compile(r"^mstar_([0-9a-f]{12})_([A-Za-z0-9_-]{20,})$")


# --- tenants and keys -------------------------------------------------------------------------------------


def ensure_tenant(s: Session, name: str) -> Tenant:
    tenant = s.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(id=new_id(), name=name)
        s.add(tenant)
        s.flush()
    return tenant


def _prefix_of(token: str) -> str:
    m = _TOKEN_RE.match(token)
    return m.group(1) if m else "h" + hashlib.sha256(token.encode()).hexdigest()[:15]


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_api_key(s: Session, tenant_name: str, *, admin: bool = False) -> str:
    """Mint a key `mstar_<prefix>_<secret>`; only its SHA-256 is stored, the token is shown once."""
    tenant = ensure_tenant(s, tenant_name)
    token = f"mstar_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"
    s.add(ApiKey(prefix=_prefix_of(token), tenant_id=tenant.id, secret_sha256=_digest(token), admin=admin))
    s.flush()
    return token


def install_api_key(s: Session, tenant_name: str, token: str, *, admin: bool = False) -> None:
    """Idempotently install a key given by configuration (bootstrap)."""
    if len(token) < 16:
        raise ValueError("bootstrap API keys must be at least 16 characters")
    tenant = ensure_tenant(s, tenant_name)
    row = s.get(ApiKey, _prefix_of(token))
    if row is None:
        s.add(ApiKey(prefix=_prefix_of(token), tenant_id=tenant.id, secret_sha256=_digest(token), admin=admin))
    else:
        row.tenant_id, row.secret_sha256, row.admin, row.revoked = tenant.id, _digest(token), admin, False
    s.flush()


def authenticate(s: Session, token: str) -> tuple[Tenant, bool] | None:
    """(tenant, is_admin) for a valid, unrevoked key; the digest comparison is constant-time."""
    if not token or len(token) > 512:
        return None
    row = s.get(ApiKey, _prefix_of(token))
    if row is None or row.revoked or not hmac.compare_digest(row.secret_sha256, _digest(token)):
        return None
    tenant = s.get(Tenant, row.tenant_id)
    return (tenant, row.admin) if tenant is not None else None


# --- slides -----------------------------------------------------------------------------------------------


def is_id(value: str | None) -> bool:
    """Ids are 32 lowercase hex digits; anything else cannot exist (and never reaches the database, where
    e.g. a NUL character is an error on PostgreSQL)."""
    return isinstance(value, str) and _ID_RE.match(value) is not None


def get_slide(s: Session, tenant_id: str, slide_id: str) -> Slide | None:
    if not is_id(slide_id):
        return None
    slide = s.get(Slide, slide_id)
    return slide if slide is not None and slide.tenant_id == tenant_id else None


def find_slide_by_sha(s: Session, tenant_id: str, sha256: str) -> Slide | None:
    return s.scalar(select(Slide).where(Slide.tenant_id == tenant_id, Slide.sha256 == sha256))


def new_slide(
    tenant_id: str, *, sha256: str, size_bytes: int, fmt: str, mpp_override: float | None, info: dict
) -> Slide:
    """A slide row not recorded yet, with its id and the blob key its bytes are committed under before
    `publish_slide` records it."""
    slide_id = new_id()
    return Slide(
        id=slide_id,
        tenant_id=tenant_id,
        sha256=sha256,
        format=fmt,
        size_bytes=size_bytes,
        blob_key=f"slides/{tenant_id}/{slide_id}.{formats.blob_extension(fmt)}",
        mpp_override=mpp_override,
        info=info,
        created_at=utcnow(),
    )


def add_slide(s: Session, slide: Slide) -> Slide:
    """Insert, or return the tenant's existing slide with the same bytes when another upload won the race."""
    try:
        with s.begin_nested():
            s.add(slide)
    except IntegrityError:
        existing = find_slide_by_sha(s, slide.tenant_id, slide.sha256)
        if existing is None:
            raise
        return existing
    return slide


def publish_slide(sessions: sessionmaker[Session], blobs: BlobStore, slide: Slide) -> Slide:
    """Record `slide`, whose blob is already committed under `slide.blob_key`. When the tenant's identical slide
    (same sha256) won a race meanwhile, this copy's blob (file or DICOM-series folder) is removed and that slide
    returned: `result.id != slide.id` tells the caller it was a duplicate."""
    with transaction(sessions) as s:
        stored = add_slide(s, slide)
    if stored.id != slide.id:
        blobs.delete(slide.blob_key)
    return stored


def list_slides(s: Session, tenant_id: str, *, limit: int, offset: int) -> tuple[list[Slide], int]:
    q = select(Slide).where(Slide.tenant_id == tenant_id)
    total = s.scalar(select(func.count()).select_from(q.subquery())) or 0
    rows = s.scalars(q.order_by(Slide.created_at.desc(), Slide.id).limit(limit).offset(offset)).all()
    return list(rows), total


def delete_slide(s: Session, slide: Slide) -> list[str]:
    """Delete a slide, its jobs and results; returns the job ids so their result blobs can go too."""
    job_ids = list(s.scalars(select(Job.id).where(Job.slide_id == slide.id)))
    if job_ids:
        s.execute(delete(Result).where(Result.job_id.in_(job_ids)))
        s.execute(delete(Job).where(Job.id.in_(job_ids)))
    s.delete(slide)
    s.flush()
    return job_ids


# --- jobs -------------------------------------------------------------------------------------------------


def _by_idem(s: Session, tenant_id: str, key: str | None) -> Job | None:
    return s.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key))


def request_digest(**fields: object) -> str:
    """A stable digest of what a request asked for (canonical JSON), kept with its Idempotency-Key."""
    import json

    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def _replay(found: Job, request_sha256: str | None) -> tuple[Job, bool]:
    if request_sha256 is not None and found.request_sha256 not in (None, request_sha256):
        raise IdempotencyConflictError(
            "this Idempotency-Key was already used with a different request; use a new key for a new request"
        )
    return found, False


def create_job(
    s: Session,
    *,
    tenant_id: str,
    slide_id: str,
    options: dict,
    idempotency_key: str | None = None,
    webhook_url: str | None = None,
    request_sha256: str | None = None,
    max_queued: int | None = None,
) -> tuple[Job, bool]:
    """(job, created). The same idempotency key from the same tenant returns the first job, if it was asked with
    the same request (`request_sha256`); with a different one it is refused (422). Past `max_queued` queued jobs
    of this tenant the submit is refused (429) and nothing is recorded."""
    if idempotency_key:
        found = _by_idem(s, tenant_id, idempotency_key)
        if found is not None:
            return _replay(found, request_sha256)
    if max_queued is not None:
        queued = s.scalar(select(func.count()).where(Job.tenant_id == tenant_id, Job.state == "queued")) or 0
        if queued >= max_queued:
            raise QuotaExceededError(
                f"this tenant already has {queued} queued jobs (the limit is {max_queued}); retry when some finish"
            )
    job = Job(
        id=new_id(),
        tenant_id=tenant_id,
        slide_id=slide_id,
        state="queued",
        options=options,
        idempotency_key=idempotency_key or None,
        request_sha256=request_sha256 if idempotency_key else None,
        webhook_url=webhook_url,
        progress=0.0,
        attempts=0,
        stage_seconds={},
        created_at=utcnow(),
    )
    try:
        with s.begin_nested():
            s.add(job)
    except IntegrityError:
        found = _by_idem(s, tenant_id, idempotency_key)
        if found is None:
            raise
        return _replay(found, request_sha256)
    return job, True


def get_job(s: Session, tenant_id: str, job_id: str) -> Job | None:
    if not is_id(job_id):
        return None
    job = s.get(Job, job_id)
    return job if job is not None and job.tenant_id == tenant_id else None


def list_jobs(
    s: Session,
    tenant_id: str,
    *,
    limit: int,
    offset: int,
    state: str | None = None,
    slide_id: str | None = None,
) -> tuple[list[Job], int]:
    q = select(Job).where(Job.tenant_id == tenant_id)
    if state:
        q = q.where(Job.state == state)
    if slide_id:
        if not is_id(slide_id):
            return [], 0
        q = q.where(Job.slide_id == slide_id)
    total = s.scalar(select(func.count()).select_from(q.subquery())) or 0
    rows = s.scalars(q.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)).all()
    return list(rows), total


def request_cancel(s: Session, job: Job) -> Job:
    """A queued job is canceled at once; a running one is flagged and its worker stops at the next poll."""
    if job.state == "queued":
        n = s.execute(
            update(Job)
            .where(Job.id == job.id, Job.state == "queued")
            .values(
                state="canceled",
                cancel_requested=True,
                finished_at=utcnow(),
                error_code="canceled",
                error_message="canceled by request",
            )
        ).rowcount
        s.refresh(job)  # lost the race: a worker may have claimed it just now, so look again
        if n:
            return job
    if job.state == "running":
        s.execute(update(Job).where(Job.id == job.id, Job.state == "running").values(cancel_requested=True))
    s.refresh(job)
    return job


def claim_next(s: Session, worker: str) -> str | None:
    """Atomically move the oldest queued job to running; its id, or None when the queue is empty."""
    oldest = select(Job.id).where(Job.state == "queued").order_by(Job.created_at).limit(8)
    candidates = s.scalars(oldest).all()
    for job_id in candidates:
        now = utcnow()
        n = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == "queued")
            .values(
                state="running",
                worker=worker,
                started_at=now,
                heartbeat_at=now,
                attempts=Job.attempts + 1,
                stage="open",
                progress=0.0,
            )
        ).rowcount
        if n == 1:
            return job_id
    return None


def update_progress(s: Session, job_id: str, stage: str, fraction: float, stage_seconds: dict) -> bool:
    """Record progress; False when the job has been asked to cancel (the worker then stops)."""
    s.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == "running")
        .values(
            stage=stage,
            progress=max(0.0, min(1.0, float(fraction))),
            stage_seconds=stage_seconds,
            heartbeat_at=utcnow(),
        )
    )
    return not cancel_requested(s, job_id)


def cancel_requested(s: Session, job_id: str) -> bool:
    """True when cancel was asked for, or the job no longer exists (deleted with its slide)."""
    flag = s.scalar(select(Job.cancel_requested).where(Job.id == job_id))
    return flag is None or bool(flag)


def finish_job(
    s: Session,
    job_id: str,
    state: str,
    *,
    error_code: str | None = None,
    error_message: str | None = None,
    stage_seconds: dict | None = None,
) -> None:
    if state not in TERMINAL_STATES:
        raise ValueError(f"not a terminal state: {state}")
    values: dict = {
        "state": state,
        "finished_at": utcnow(),
        "error_code": error_code,
        "error_message": error_message,
    }
    if state == "succeeded":
        values.update(progress=1.0, stage="done")
    if stage_seconds is not None:
        values["stage_seconds"] = stage_seconds
    s.execute(update(Job).where(Job.id == job_id, Job.state.in_(("queued", "running"))).values(**values))


def requeue(s: Session, job_id: str) -> None:
    s.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == "running")
        .values(state="queued", worker=None, stage=None, progress=0.0)
    )


def recover_orphans(s: Session, *, max_attempts: int, stale_before: datetime | None = None) -> dict[str, int]:
    """Jobs left `running` by a stopped server go back to the queue (or fail once out of attempts).

    `stale_before=None` takes every running job: right for the embedded runner, whose gateway is the only
    one working on this database. Distributed workers pass a heartbeat cutoff instead.
    """
    q = select(Job).where(Job.state == "running")
    if stale_before is not None:
        q = q.where((Job.heartbeat_at.is_(None)) | (Job.heartbeat_at < stale_before))
    out = {"requeued": 0, "failed": 0, "canceled": 0}
    for job in s.scalars(q).all():
        if job.cancel_requested:
            finish_job(s, job.id, "canceled", error_code="canceled", error_message="canceled by request")
            out["canceled"] += 1
        elif job.attempts >= max_attempts:
            finish_job(
                s,
                job.id,
                "failed",
                error_code="worker_lost",
                error_message=f"the worker stopped during the job {job.attempts} times",
            )
            out["failed"] += 1
        else:
            requeue(s, job.id)
            out["requeued"] += 1
    return out


def count_by_state(s: Session) -> dict[str, int]:
    counts = dict.fromkeys(JOB_STATES, 0)
    for state, n in s.execute(select(Job.state, func.count()).group_by(Job.state)):
        counts[state] = int(n)
    return counts


def stale_cutoff(seconds: float) -> datetime:
    return utcnow() - timedelta(seconds=seconds)


# --- results ----------------------------------------------------------------------------------------------


def save_result(s: Session, job: Job, files: dict) -> Result:
    row = s.get(Result, job.id)
    if row is None:
        row = Result(job_id=job.id, tenant_id=job.tenant_id, files=files, created_at=utcnow())
        s.add(row)
    else:
        row.files = files
    s.flush()
    return row


def get_result(s: Session, tenant_id: str, job_id: str) -> Result | None:
    if not is_id(job_id):
        return None
    row = s.get(Result, job_id)
    return row if row is not None and row.tenant_id == tenant_id else None
