"""Result views built from a finished job's files without re-running a model: QuPath GeoJSON and the heatmap
re-rendered at any pyramid level. Tenant-checked; only succeeded jobs have results (409 otherwise)."""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from contextlib import ExitStack
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

from service.api.deps import ContextDep, TenantDep
from service.api.errors import NotFoundError
from service.api.lookups import succeeded_files
from service.api.responses import ERRORS, not_modified

router = APIRouter(tags=["jobs"])
CACHE = "private, max-age=3600"


class _Lru:
    """Rendered views of finished jobs (immutable), at most `max_bytes` held."""

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self.max_bytes, self._bytes = max_bytes, 0
        self._items: OrderedDict[tuple, tuple[bytes, dict]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> tuple[bytes, dict] | None:
        """(body, headers) of a view rendered before, or None."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        return None

    def put(self, key: tuple, data: bytes, headers: dict) -> None:
        with self._lock:
            if key not in self._items and len(data) <= self.max_bytes:
                self._items[key] = (data, headers)
                self._bytes += len(data)
            while self._bytes > self.max_bytes:
                _, (old, _) = self._items.popitem(last=False)
                self._bytes -= len(old)


_VIEWS = _Lru()


def _etag(key: tuple) -> str:
    """A view's bytes follow from the job's per-patch scores and the view's parameters (`key`)."""
    import hashlib

    return '"' + hashlib.sha256(repr(key).encode()).hexdigest()[:32] + '"'


def _result_files(ctx, principal, job_id: str) -> dict:
    files, _ = succeeded_files(ctx, principal.tenant_id, job_id)
    if "patch_scores.h5" not in files:
        raise NotFoundError(
            "this job has no per-patch scores (analysed without a model bundle, or before they existed)"
        )
    return files


def _load(ctx, files: dict):
    from service.results import patch_scores

    with ExitStack() as stack:
        res_path = stack.enter_context(ctx.blobs.local_copy(files["result.json"]["key"]))
        ps_path = stack.enter_context(ctx.blobs.local_copy(files["patch_scores.h5"]["key"]))
        return json.loads(res_path.read_text()), patch_scores.read(ps_path)


def _geojson(ctx, files: dict) -> bytes:
    from service.results import geojson

    result, scores = _load(ctx, files)
    return json.dumps(geojson.build(result, scores), separators=(",", ":")).encode()


@router.get(
    "/jobs/{job_id}/annotations.geojson",
    response_class=Response,
    responses={
        200: {
            "content": {"application/geo+json": {}},
            "description": "QuPath GeoJSON: tissue (and region) annotations, patch detections with measurements",
        },
        **ERRORS(401, 404, 409),
    },
    summary="Results as QuPath GeoJSON (level-0 pixels)",
)
async def annotations(job_id: str, principal: TenantDep, ctx: ContextDep, request: Request) -> Response:
    files = await run_in_threadpool(_result_files, ctx, principal, job_id)
    key = ("geojson", job_id, files["patch_scores.h5"]["sha256"])
    etag = _etag(key)
    unchanged = not_modified(request, etag, {"Cache-Control": CACHE})
    if unchanged is not None:
        return unchanged
    cached = _VIEWS.get(key)
    if cached is None:
        headers = {
            "Cache-Control": CACHE,
            "ETag": etag,
            "Content-Disposition": f'attachment; filename="{job_id}.geojson"',
        }
        cached = (await run_in_threadpool(_geojson, ctx, files), headers)
        _VIEWS.put(key, *cached)
    return Response(cached[0], media_type="application/geo+json", headers=cached[1])


def _heatmap(ctx, files: dict, level: int | None, score: str, alpha: float) -> tuple[bytes, int | str]:
    from service.results import heatmap_levels as hl

    result, scores = _load(ctx, files)
    dims = result["slide"]["level_dimensions"]
    chosen: int | str
    if level is None:  # the finest level small enough for a browser overlay
        chosen = level = next((i for i, (w, h) in enumerate(dims) if w * h <= hl.OVERLAY_PIXELS), len(dims))
        if level == len(dims):
            # no such level (a slide without a pyramid): the default was its only level, over the size limit, so
            # the viewer had no overlay; an overview-sized canvas instead (the overlay is stretched to the slide)
            (w0, h0), f = dims[0], math.sqrt(hl.OVERLAY_PIXELS / (dims[0][0] * dims[0][1]))
            dims, chosen = [*dims, [max(1, int(w0 * f)), max(1, int(h0 * f))]], "overview"
    else:
        chosen = level
    rgba = hl.render_rgba(scores, dims, level, score=score, alpha=alpha)
    return hl.png_bytes(rgba), chosen


@router.get(
    "/jobs/{job_id}/heatmap",
    response_class=Response,
    responses={
        200: {
            "content": {"image/png": {}},
            "description": "RGBA PNG the size of the level; transparent = not analysed",
        },
        **ERRORS(401, 404, 409, 422),
    },
    summary="A per-patch score re-rendered at a pyramid level (no model run)",
)
async def heatmap(
    job_id: str,
    principal: TenantDep,
    ctx: ContextDep,
    request: Request,
    level: Annotated[int | None, Query(ge=0, le=40)] = None,
    score: Annotated[str, Query(min_length=1, max_length=200)] = "attention",
    alpha: Annotated[float, Query(ge=0, le=1)] = 1.0,
) -> Response:
    files = await run_in_threadpool(_result_files, ctx, principal, job_id)
    key = ("heatmap", job_id, files["patch_scores.h5"]["sha256"], level, score, alpha)
    cached = _VIEWS.get(key)
    if cached is None:  # rendered (and so checked) before any 304: a bad level or score is a 422 either way
        data, chosen = await run_in_threadpool(_heatmap, ctx, files, level, score, alpha)
        cached = (data, {"Cache-Control": CACHE, "ETag": _etag(key), "X-Pyramid-Level": str(chosen)})
        _VIEWS.put(key, *cached)
    kept = {k: cached[1][k] for k in ("Cache-Control", "X-Pyramid-Level")}
    unchanged = not_modified(request, cached[1]["ETag"], kept)
    if unchanged is not None:
        return unchanged
    return Response(cached[0], media_type="image/png", headers=cached[1])
