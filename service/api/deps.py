"""FastAPI dependencies as `Annotated` aliases: settings, a DB session, the calling tenant, admin scope.

Credentials come from `Authorization: Bearer <key>` or `X-API-Key: <key>` (never the query string, where
they would land in access logs). Both are declared as OpenAPI security schemes so clients and fuzzers
see them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.api.context import ServiceContext
from service.api.errors import ForbiddenError, UnauthorizedError
from service.config import Settings
from service.obs.context import bind_log_context
from service.store import repo


@dataclass(frozen=True)
class Principal:
    tenant_id: str
    tenant: str
    admin: bool
    key_prefix: str | None = None  # the presented key's public half (audit log)


def get_context(request: Request) -> ServiceContext:
    return request.app.state.ctx


def get_settings(request: Request) -> Settings:
    return request.app.state.ctx.settings


_bearer = HTTPBearer(auto_error=False, description="API key as a bearer token")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key header")

SettingsDep = Annotated[Settings, Depends(get_settings)]
ContextDep = Annotated[ServiceContext, Depends(get_context)]


def _tokens(request: Request) -> list[str]:
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
    return tokens


def _lookup(ctx: ServiceContext, tokens: list[str]) -> Principal:
    """Check the keys in the database (a short session of its own, released before any body is read)."""
    with ctx.sessions() as session:
        found = [repo.authenticate(session, t) for t in tokens]
    if any(f is None for f in found) or len({f[0].id for f in found}) != 1:
        raise UnauthorizedError("invalid API key")
    tenant = found[0][0]
    principal = Principal(
        tenant_id=tenant.id, tenant=tenant.name, admin=all(f[1] for f in found), key_prefix=repo.key_prefix(tokens[0])
    )
    ctx.auth_cache.put(tokens, principal)
    return principal


def _identified(request: Request, principal: Principal) -> Principal:
    """Remember the caller on the request: the audit middleware and the log context read it after the route."""
    request.state.principal = principal
    bind_log_context(tenant=principal.tenant_id)
    return principal


def principal_of(request: Request, ctx: ServiceContext) -> Principal:
    """The caller, for code that runs outside dependency injection (synchronous)."""
    tokens = _tokens(request)
    return _identified(request, ctx.auth_cache.get(tokens) or _lookup(ctx, tokens))


async def current_principal(
    request: Request,
    ctx: ContextDep,
    _bearer_doc: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    _key_doc: Annotated[str | None, Security(_api_key)],
) -> Principal:
    """Every credential presented must be valid and name the same tenant: an ambiguous request (a bad
    `Authorization` next to a good `X-API-Key`) is refused rather than silently half-authenticated. A key seen
    within the last `MSTAR_AUTH_CACHE_S` is answered from memory, without a database round trip or a thread."""
    tokens = _tokens(request)
    cached = ctx.auth_cache.get(tokens)
    if cached is not None:
        return _identified(request, cached)
    return _identified(request, await run_in_threadpool(_lookup, ctx, tokens))


TenantDep = Annotated[Principal, Depends(current_principal)]


def require_admin(principal: TenantDep) -> Principal:
    if not principal.admin:
        raise ForbiddenError("this operation needs an admin key")
    return principal


AdminDep = Annotated[Principal, Depends(require_admin)]
