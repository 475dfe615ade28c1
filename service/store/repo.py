"""Repository functions: every read of a tenant's object takes the tenant id, so scoping is not optional.

Job rows are only read here: every change of a job's state is in `service.jobs.lifecycle`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from datetime import UTC, datetime

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service.errors import MstarError
from service.slides import formats
from service.store.blobs import BlobStore
from service.store.db import transaction
from service.store.models import (
    ApiKey,
    Job,
    Result,
    Slide,
    Tenant,
    UploadKey,
    new_id,
    utcnow,
)

_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_TOKEN_RE = re.compile(r"^mstar_([0-9a-f]{12})_([A-Za-z0-9_-]{20,})$")
# a key's public half as `mstar keys list` shows it: 12 hex digits of a minted key (also written `mstar_<prefix>`,
# the start of the key), or `h` and 15 hex digits of a key given in MSTAR_API_KEYS
_PREFIX_RE = re.compile(r"^(?:mstar_)?([0-9a-f]{12})_?$|^(h[0-9a-f]{15})$")

log = logging.getLogger("mstar.store")


class UnknownApiKeyError(MstarError):
    """No API key matches what was named (`mstar keys revoke`)."""

    code = "unknown_key"
    http_status = 404


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


def key_prefix(token: str) -> str:
    """The public half of an API key (what the audit log and the key table name it by); never the secret."""
    return _prefix_of(token)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_api_key(s: Session, tenant_name: str, *, admin: bool = False) -> str:
    """Mint a key `mstar_<prefix>_<secret>`; only its SHA-256 is stored, the token is shown once."""
    tenant = ensure_tenant(s, tenant_name)
    token = f"mstar_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"
    s.add(ApiKey(prefix=_prefix_of(token), tenant_id=tenant.id, secret_sha256=_digest(token), admin=admin))
    s.flush()
    return token


def install_api_key(s: Session, tenant_name: str, token: str, *, admin: bool = False) -> bool:
    """Idempotently install a key given by configuration (bootstrap); False when it stays unusable because it was
    revoked (`mstar keys revoke`): a revoked key is never brought back by a restart, even while still configured."""
    if len(token) < 16:
        raise ValueError("bootstrap API keys must be at least 16 characters")
    prefix = _prefix_of(token)
    row = s.get(ApiKey, prefix)
    if row is not None and row.revoked:
        log.warning(
            "API key %s from MSTAR_API_KEYS (tenant %s) is revoked and stays revoked: remove it from MSTAR_API_KEYS "
            "and configure a new key",
            prefix,
            tenant_name,
        )
        return False
    tenant = ensure_tenant(s, tenant_name)
    if row is None:
        s.add(ApiKey(prefix=prefix, tenant_id=tenant.id, secret_sha256=_digest(token), admin=admin))
    else:
        row.tenant_id, row.secret_sha256, row.admin = tenant.id, _digest(token), admin
    s.flush()
    return True


def find_api_key(s: Session, ident: str) -> ApiKey | None:
    """The key `ident` names: its public prefix as `mstar keys list` shows it (also `mstar_<prefix>`), or the whole
    key (then its secret must match too, so a mistyped key never names another one)."""
    ident = ident.strip()
    m = _PREFIX_RE.match(ident)
    if m:
        row = s.get(ApiKey, m.group(1) or m.group(2))
        if row is not None:
            return row
    if not ident or len(ident) > 512:
        return None
    row = s.get(ApiKey, _prefix_of(ident))
    if row is not None and hmac.compare_digest(row.secret_sha256, _digest(ident)):
        return row
    return None


def list_api_keys(s: Session, tenant_name: str | None = None) -> list[tuple[ApiKey, str]]:
    """Every key with its tenant's name (no secrets: only digests are stored), by tenant, oldest first."""
    q = select(ApiKey, Tenant.name).join(Tenant, Tenant.id == ApiKey.tenant_id)
    if tenant_name is not None:
        q = q.where(Tenant.name == tenant_name)
    return [(key, name) for key, name in s.execute(q.order_by(Tenant.name, ApiKey.created_at, ApiKey.prefix))]


def revoke_api_key(s: Session, ident: str) -> tuple[ApiKey, str, bool]:
    """Revoke the key `ident` names (see `find_api_key`): (key, tenant name, whether it was revoked already).

    Gateways refuse it from their next check: at once, or within `MSTAR_AUTH_CACHE_S` where they had just seen it.
    Raises `UnknownApiKeyError` (without repeating `ident`, which may be a secret) when no key matches."""
    row = find_api_key(s, ident)
    if row is None:
        shown = f" {ident.strip()!r}" if _PREFIX_RE.match(ident.strip()) else ""
        raise UnknownApiKeyError(f"no API key matches{shown} (see `mstar keys list`)")
    tenant = s.get(Tenant, row.tenant_id)
    already = bool(row.revoked)
    row.revoked = True
    s.flush()
    return row, tenant.name if tenant is not None else row.tenant_id, already


def key_created_at(row: ApiKey) -> datetime:
    """When `row` was made, in UTC (SQLite gives the stored UTC time back without its zone)."""
    at = row.created_at
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


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
    s.execute(delete(UploadKey).where(UploadKey.slide_id == slide.id))
    if job_ids:
        s.execute(delete(Result).where(Result.job_id.in_(job_ids)))
        s.execute(delete(Job).where(Job.id.in_(job_ids)))
    s.delete(slide)
    s.flush()
    return job_ids


# --- jobs -------------------------------------------------------------------------------------------------


def request_digest(**fields: object) -> str:
    """A stable digest of what a request asked for (canonical JSON), kept with its Idempotency-Key."""
    import json

    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


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


# --- results ----------------------------------------------------------------------------------------------


def get_result(s: Session, tenant_id: str, job_id: str) -> Result | None:
    if not is_id(job_id):
        return None
    row = s.get(Result, job_id)
    return row if row is not None and row.tenant_id == tenant_id else None
