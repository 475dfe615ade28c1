"""The audit log: append and read, nothing else. There is deliberately no update or delete here (and the migration's
triggers refuse both in the database), so the record of who did what cannot be rewritten by the service."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.store.models import AuditEvent


def _utc(t: datetime | None) -> datetime | None:
    """Aware and in UTC, as stored (SQLite keeps the wall-clock fields only, so an offset must be applied first)."""
    if t is None:
        return None
    try:
        return t.astimezone(UTC) if t.tzinfo else t.replace(tzinfo=UTC)
    except OverflowError:  # an offset at the very ends of the calendar: the end it is at
        return (datetime.min if t.year == 1 else datetime.max).replace(tzinfo=UTC)


def append(s: Session, **fields: object) -> AuditEvent:
    """Add one event (the caller's transaction commits it)."""
    event = AuditEvent(**fields)
    s.add(event)
    return event


def query(
    s: Session,
    *,
    tenant_id: str | None = None,
    action: str | None = None,
    resource_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[AuditEvent], int]:
    """Events matching the filters, newest first, and how many match in all."""
    where = []
    since, until = _utc(since), _utc(until)
    if tenant_id is not None:
        where.append(AuditEvent.tenant_id == tenant_id)
    if action is not None:
        where.append(AuditEvent.action == action)
    if resource_id is not None:
        where.append(AuditEvent.resource_id == resource_id)
    if since is not None:
        where.append(AuditEvent.at >= since)
    if until is not None:
        where.append(AuditEvent.at < until)
    total = s.scalar(select(func.count()).select_from(AuditEvent).where(*where)) or 0
    newest_first = (AuditEvent.at.desc(), AuditEvent.id.desc())
    rows = s.scalars(select(AuditEvent).where(*where).order_by(*newest_first).limit(limit).offset(offset)).all()
    return list(rows), total
