"""`/jobs`: status, cancel and results. Every lookup is scoped to the caller's tenant."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from service.api.deps import ContextDep, TenantDep
from service.api.errors import NotFoundError, NotReadyError
from service.api.lookups import POLLS, succeeded_files
from service.api.responses import ERRORS, not_modified
from service.api.schemas import JobOut, JobPage, JobState
from service.api.views import job_out
from service.jobs import lifecycle, rna_channel
from service.store import repo
from service.store.db import transaction
from service.store.models import TERMINAL_STATES

router = APIRouter(tags=["jobs"])


@router.get("/jobs", response_model=JobPage, responses=ERRORS(401, 422), summary="List your jobs")
def list_jobs(
    principal: TenantDep,
    ctx: ContextDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
    state: JobState | None = None,
    slide_id: Annotated[str | None, Query(max_length=64)] = None,
) -> JobPage:
    with ctx.sessions() as session:
        rows, total = repo.list_jobs(
            session, principal.tenant_id, limit=limit, offset=offset, state=state, slide_id=slide_id
        )
        return JobPage.of([job_out(r) for r in rows], total=total, limit=limit, offset=offset)


def _read_job(ctx, tenant_id: str, job_id: str) -> JobOut:
    with ctx.sessions() as session:
        job = repo.get_job(session, tenant_id, job_id)
        if job is None:
            raise NotFoundError("no such job")
        return job_out(job, repo.get_result(session, tenant_id, job_id) if job.state == "succeeded" else None)


@router.get("/jobs/{job_id}", response_model=JobOut, responses=ERRORS(401, 404))
async def get_job(job_id: str, principal: TenantDep, ctx: ContextDep) -> Response:
    """Polled by every client: clients polling one job share one read per `POLL_CACHE_S` (a fifth of a second),
    else one thread hop and one short session."""
    body = POLLS.get(principal.tenant_id, job_id)
    if body is None:
        out = await run_in_threadpool(_read_job, ctx, principal.tenant_id, job_id)
        body = POLLS.put(principal.tenant_id, job_id, out.model_dump_json().encode())
    return Response(body, media_type="application/json")


@router.post(
    "/jobs/{job_id}/cancel",
    status_code=202,
    response_model=JobOut,
    responses=ERRORS(401, 404, 409),
    summary="Cancel a queued or running job",
)
def cancel_job(job_id: str, principal: TenantDep, ctx: ContextDep) -> JobOut:
    with transaction(ctx.sessions) as s:
        job = repo.get_job(s, principal.tenant_id, job_id)
        if job is None:
            raise NotFoundError("no such job")
        if job.state in TERMINAL_STATES:
            raise NotReadyError(f"job already {job.state}")
        job, released = lifecycle.request_cancel(s, job)
        out = job_out(job)
    POLLS.forget(principal.tenant_id, [job_id])
    if out.state == "canceled":  # ended while queued: no attempt will remove its RNA profile, so do it now
        rna_channel.discard(ctx.blobs, [out.id])
        ctx.job_terminal(out.id)
    for job_id in released:  # identical jobs that waited for this one now run themselves
        ctx.queue.notify(job_id)
    return out


def _file(ctx, principal, job_id: str, name: str) -> tuple[str, dict]:
    files, _ = succeeded_files(ctx, principal.tenant_id, job_id)
    if name not in files or not ctx.blobs.exists(files[name]["key"]):
        raise NotFoundError(f"this job produced no {name}")
    return files[name]["key"], files[name]


def _send(ctx, request: Request, key: str, meta: dict, media_type: str, filename: str | None = None) -> Response:
    """A stored result file: the file itself from a filesystem store; streamed in chunks from an object store
    (never read whole into memory), with its length, so a cut stream is an error the client sees. Its ETag is its
    sha256, and a matching If-None-Match is a 304 (it was ignored: every revalidation sent the whole file)."""
    headers = {"X-Content-SHA256": meta["sha256"], "ETag": f'"{meta["sha256"]}"'}
    unchanged = not_modified(request, headers["ETag"], {"X-Content-SHA256": meta["sha256"]})
    if unchanged is not None:
        return unchanged
    if ctx.blobs.is_local:
        return FileResponse(ctx.blobs.local_path(key), media_type=media_type, filename=filename, headers=headers)
    body = ctx.blobs.open(key)
    if meta.get("size") is not None:
        headers["Content-Length"] = str(meta["size"])
    if filename:
        headers["Content-Disposition"] = f'attachment; filename="{filename}"'

    def chunks():
        while data := body.read(1 << 20):
            yield data

    return StreamingResponse(chunks(), media_type=media_type, headers=headers, background=BackgroundTask(body.close))


@router.get(
    "/jobs/{job_id}/result",
    responses={
        200: {"content": {"application/json": {}}, "description": "result.json as the pipeline wrote it"},
        **ERRORS(401, 404, 409),
    },
)
def get_result(job_id: str, principal: TenantDep, ctx: ContextDep, request: Request) -> Response:
    key, meta = _file(ctx, principal, job_id, "result.json")
    if not ctx.blobs.is_local or request.headers.get("if-none-match"):
        return _send(ctx, request, key, meta, "application/json")
    with ctx.blobs.open(key) as fh:  # the bytes the pipeline wrote, checksum and all: no re-encoding
        data = fh.read()
    headers = {"X-Content-SHA256": meta["sha256"], "ETag": f'"{meta["sha256"]}"'}
    return Response(data, media_type="application/json", headers=headers)


@router.get(
    "/jobs/{job_id}/features",
    response_class=FileResponse,
    responses={
        200: {
            "content": {"application/x-hdf5": {}},
            "description": "features.h5: `features` [N, D] float32, `coords` [N, 2] level-0",
        },
        **ERRORS(401, 404, 409),
    },
)
def get_features(job_id: str, principal: TenantDep, ctx: ContextDep, request: Request) -> Response:
    key, meta = _file(ctx, principal, job_id, "features.h5")
    return _send(ctx, request, key, meta, "application/x-hdf5", filename=f"{job_id}-features.h5")


@router.get(
    "/jobs/{job_id}/heatmap.png",
    response_class=FileResponse,
    responses={
        200: {"content": {"image/png": {}}, "description": "attention heatmap"},
        **ERRORS(401, 404, 409),
    },
)
def get_heatmap(job_id: str, principal: TenantDep, ctx: ContextDep, request: Request) -> Response:
    key, meta = _file(ctx, principal, job_id, "heatmap.png")
    return _send(ctx, request, key, meta, "image/png")
