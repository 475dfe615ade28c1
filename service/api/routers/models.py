"""`/models`: what bundle this service runs (read from its manifest), and an admin-only reload."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import AdminDep, ContextDep, TenantDep
from service.api.responses import ERRORS
from service.api.schemas import ModelsOut

router = APIRouter(tags=["models"])


@router.get(
    "/models",
    response_model=ModelsOut,
    responses=ERRORS(401),
    summary="The served model bundle: versions, heads and their labels",
)
def get_models(principal: TenantDep, ctx: ContextDep) -> ModelsOut:
    return ctx.models_out()


@router.post(
    "/models/reload",
    response_model=ModelsOut,
    responses=ERRORS(401, 403),
    summary="Re-read and re-verify the bundle manifest (admin)",
)
def reload_models(principal: AdminDep, ctx: ContextDep) -> ModelsOut:
    ctx.load_bundle()
    return ctx.models_out()
