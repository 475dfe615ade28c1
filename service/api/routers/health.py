"""Liveness, readiness (store, runner and model backend checked for real) and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from service.api.deps import ContextDep, principal_of, require_admin
from service.api.responses import ERRORS
from service.api.schemas import HealthOut

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthOut, summary="The process is up")
async def healthz() -> HealthOut:
    return HealthOut(status="ok")


@router.get(
    "/readyz",
    response_model=HealthOut,
    responses={503: {"model": HealthOut, "description": "not ready"}},
    summary="Store, runner and model backend all usable",
)
async def readyz(ctx: ContextDep) -> JSONResponse:
    checks = await run_in_threadpool(ctx.readiness)
    ok = all(c.get("ok") for c in checks.values())
    body = HealthOut(status="ok" if ok else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if ok else 503)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}, **ERRORS(401, 403)},
    summary="Prometheus metrics (an admin key unless MSTAR_METRICS_PUBLIC)",
)
def metrics(request: Request, ctx: ContextDep) -> Response:
    if not ctx.settings.metrics_public:  # counts across every tenant: admins (and the scraper's key) only
        require_admin(principal_of(request, ctx))
    data, ctype = ctx.metrics.render()
    return Response(data, media_type=ctype)
