"""FastAPI dependencies as `Annotated` aliases: settings, a DB session, the calling tenant, admin scope.

Credentials come from `Authorization: Bearer <key>` or `X-API-Key: <key>` (never the query string, where
they would land in access logs). Both are declared as OpenAPI security schemes so clients and fuzzers
see them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from service.api.errors import ForbiddenError, UnauthorizedError
from service.config import Settings
from service.store import repo

if TYPE_CHECKING:
    from service.api.app import ServiceContext


@dataclass(frozen=True)
class Principal:
    tenant_id: str
    tenant: str
    admin: bool


def get_context(request: Request) -> ServiceContext:
    return request.app.state.ctx


def get_settings(request: Request) -> Settings:
    return request.app.state.ctx.settings


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.ctx.sessions() as session:
        yield session


_bearer = HTTPBearer(auto_error=False, description="API key as a bearer token")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key header")

SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
ContextDep = Annotated[Any, Depends(get_context)]  # a ServiceContext


def current_principal(
    request: Request,
    session: SessionDep,
    _bearer_doc: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    _key_doc: Annotated[str | None, Security(_api_key)],
) -> Principal:
    """Every credential presented must be valid and name the same tenant: an ambiguous request (a bad
    `Authorization` next to a good `X-API-Key`) is refused rather than silently half-authenticated."""
    tokens: list[str] = []
    auth = request.headers.get("authorization")
    if auth is not None:
        scheme, _, value = auth.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise UnauthorizedError("Authorization must be `Bearer <API key>`")
        tokens.append(value.strip())
    if request.headers.get("x-api-key") is not None:
        tokens.append(request.headers["x-api-key"].strip())
    if not tokens:
        raise UnauthorizedError("missing API key (send `Authorization: Bearer <key>` or `X-API-Key`)")
    found = [repo.authenticate(session, t) for t in tokens]
    if any(f is None for f in found) or len({f[0].id for f in found}) != 1:
        raise UnauthorizedError("invalid API key")
    tenant = found[0][0]
    return Principal(tenant_id=tenant.id, tenant=tenant.name, admin=all(f[1] for f in found))


TenantDep = Annotated[Principal, Depends(current_principal)]


def require_admin(principal: TenantDep) -> Principal:
    if not principal.admin:
        raise ForbiddenError("this operation needs an admin key")
    return principal


AdminDep = Annotated[Principal, Depends(require_admin)]
