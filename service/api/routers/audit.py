"""`GET /audit`: the audit log for admin keys (paged, newest first; filter by tenant, action, resource, time)."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import BeforeValidator

from service.api.deps import AdminDep, ContextDep
from service.api.responses import ERRORS
from service.api.schemas import AuditEventOut, AuditPage
from service.store import audit

router = APIRouter(tags=["audit"])


def _iso_only(value: object) -> object:
    """The schema says date-time: refuse what pydantic would otherwise read as a Unix timestamp (`until=0.5`)."""
    if isinstance(value, str) and not re.match(r"^\d{4}-\d{2}-\d{2}", value):
        raise ValueError("expected an ISO 8601 date-time, e.g. 2026-12-06T10:00:00Z")
    return value


IsoDateTime = Annotated[datetime, BeforeValidator(_iso_only)]

_PRINTABLE = r"^[\x20-\x7e]*$"  # ids are plain ASCII; a NUL would be a database error on PostgreSQL
Action = Literal["create", "read", "download", "cancel", "delete", "reload"]


@router.get("/audit", response_model=AuditPage, responses=ERRORS(401, 403, 422), summary="The audit log (admins)")
def list_audit(
    _admin: AdminDep,
    ctx: ContextDep,
    tenant_id: Annotated[str | None, Query(max_length=32, pattern=_PRINTABLE)] = None,
    action: Action | None = None,
    resource_id: Annotated[str | None, Query(max_length=64, pattern=_PRINTABLE)] = None,
    since: Annotated[IsoDateTime | None, Query(description="ISO 8601, inclusive")] = None,
    until: Annotated[IsoDateTime | None, Query(description="ISO 8601, exclusive")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
) -> AuditPage:
    with ctx.sessions() as session:
        rows, total = audit.query(
            session,
            tenant_id=tenant_id,
            action=action,
            resource_id=resource_id,
            since=since,
            until=until,
            limit=limit,
            offset=offset,
        )
        items = [AuditEventOut.model_validate(r, from_attributes=True) for r in rows]
    return AuditPage.of(items, total=total, limit=limit, offset=offset)
