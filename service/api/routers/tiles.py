"""`/slides/{id}/dzi` and `/slides/{id}/tiles/{level}/{col}_{row}.jpeg`: Deep Zoom tiles for the viewer.

Tenant-checked like every slide route (another tenant's slide is 404), cached in memory and in the browser
(`Cache-Control: private`, immutable: a slide id always names the same bytes; an ETag per tile, so a browser
or proxy that revalidates gets a 304 without a tile being rendered), and cut only from the pyramid.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, Response
from fastapi.concurrency import run_in_threadpool

from service.api.deps import ContextDep, TenantDep
from service.api.errors import NotFoundError
from service.api.responses import ERRORS, not_modified
from service.api.tiles import check_tile, tile_etag
from service.errors import UnsupportedFormatError
from service.pacs.jobs import PACS_FORMAT
from service.store import repo

router = APIRouter(tags=["viewer"])
CACHE = "private, max-age=86400, immutable"


def _slide(ctx, principal, slide_id: str) -> tuple[str, str, float | None, str]:
    """The tenant's slide (404 for another tenant's), looked up in one short session on a worker thread."""
    with ctx.sessions() as session:
        slide = repo.get_slide(session, principal.tenant_id, slide_id)
        if slide is None:
            raise NotFoundError("no such slide")
        if slide.format == PACS_FORMAT:  # nothing stored here to cut tiles from; its results are viewable
            raise UnsupportedFormatError("this slide lives in a PACS and is read there only by analyses: no tiles")
        return slide.id, slide.blob_key, slide.mpp_override, slide.sha256


@router.get(
    "/slides/{slide_id}/dzi",
    responses=ERRORS(401, 404, 415, 422),
    summary="Deep Zoom description of a slide (OpenSeadragon tile source)",
)
async def deep_zoom(slide_id: str, principal: TenantDep, ctx: ContextDep, request: Request) -> dict:
    sid, key, mpp, _ = await run_in_threadpool(_slide, ctx, principal, slide_id)
    info = await run_in_threadpool(request.app.state.tiles.info, sid, key, mpp)
    return {**info.to_json(), "tiles": f"/slides/{sid}/tiles/{{level}}/{{col}}_{{row}}.jpeg"}


@router.get(
    "/slides/{slide_id}/tiles/{level}/{tile}.jpeg",
    response_class=Response,
    responses={
        200: {"content": {"image/jpeg": {}}},
        304: {"description": "the tile named by If-None-Match is current"},
        **ERRORS(401, 404, 415, 422),
    },
    summary="One Deep Zoom tile (JPEG)",
)
async def tile(
    slide_id: str,
    level: Annotated[int, Path(ge=0, le=40)],
    tile: Annotated[str, Path(pattern=r"^[0-9]{1,6}_[0-9]{1,6}$")],
    principal: TenantDep,
    ctx: ContextDep,
    request: Request,
) -> Response:
    sid, key, mpp, sha = await run_in_threadpool(_slide, ctx, principal, slide_id)
    col, row = (int(v) for v in tile.split("_"))
    info = await run_in_threadpool(request.app.state.tiles.info, sid, key, mpp)
    check_tile(info, level, col, row)
    etag = tile_etag(sha, level, col, row)
    unchanged = not_modified(request, etag, {"Cache-Control": CACHE})
    if unchanged is not None:
        return unchanged
    data = await run_in_threadpool(request.app.state.tiles.tile, sid, key, mpp, level, col, row)
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": CACHE, "ETag": etag})
