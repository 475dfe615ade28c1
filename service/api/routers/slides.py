"""`/slides`: streamed upload (with an optional analysis), listing, lookup and deletion, all per tenant."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Body, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from service import dicom_series
from service.api.deps import ContextDep, SessionDep, TenantDep
from service.api.errors import NotFoundError
from service.api.responses import ERRORS, UPLOAD_BODY
from service.api.schemas import AnalysisRequest, JobOut, SlideOut, SlidePage, UploadAccepted
from service.api.upload import parse_bool, parse_mpp, probe_slide, receive_upload
from service.api.views import job_out, slide_out
from service.store import repo
from service.store.db import transaction
from service.store.models import Slide

log = logging.getLogger("mstar.api")
router = APIRouter(tags=["slides"])

UNCAPPED = 1 << 62
IdemHeader = Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255)]


@router.post(
    "/slides",
    status_code=202,
    response_model=UploadAccepted,
    openapi_extra=UPLOAD_BODY,
    max_body_size=UNCAPPED,  # overrides the app's JSON cap: `receive_upload` enforces MSTAR_UPLOAD_MAX_BYTES
    responses={
        200: {"model": SlideOut, "description": "these bytes were uploaded before (analyze=false)"},
        201: {"model": SlideOut, "description": "stored (analyze=false)"},
        202: {"description": "stored and an analysis queued; `Location` names the job"},
        **ERRORS(400, 401, 403, 404, 413, 415, 422, 503),
    },
    summary="Upload a slide (multipart `file`, or `source`: an s3:// URI), optionally queueing an analysis",
    description=(
        "Send the slide as the multipart part `file`, or instead a form field `source` naming an "
        "`s3://bucket/key` object: a server whose store is S3 (MSTAR_BLOB_URL=s3://...) copies it into its "
        "store with its own credentials, then checks, deduplicates and stores it exactly like an uploaded file "
        "(same size limit, 413; a missing object is 404 `slide_not_found`). Both or neither, a `source` that "
        "is not s3://, or a server without the S3 store: 422 with the reason. Only buckets the operator lists "
        "in MSTAR_S3_SOURCE_BUCKETS may be named, never the store's own prefix: 403 `source_not_allowed`."
    ),
)
async def upload_slide(
    request: Request, principal: TenantDep, ctx: ContextDep, idempotency_key: IdemHeader = None
) -> Response:
    settings = ctx.settings
    parsed = await receive_upload(request, ctx.blobs, settings)
    writer = parsed.writer
    try:
        source = parsed.fields.get("source")
        if writer is None and source:
            writer = ctx.blobs.writer()
            await run_in_threadpool(
                _copy_source, ctx.blobs, source, writer, settings.upload_max_bytes, settings.s3_source_buckets
            )
        elif writer is None or source:
            from service.errors import InvalidParameterError

            raise InvalidParameterError(
                "send exactly one of the multipart part `file` (the slide) and the field `source` (an s3:// URI)"
            )
        ctx.metrics.upload_bytes.inc(writer.size)
        analyze = parse_bool(parsed.fields.get("analyze"), "analyze", True)
        mpp = parse_mpp(parsed.fields.get("mpp_override"))
        series: tuple[Slide, bool] | None = None
        if dicom_series.is_zip(writer.path):  # one DICOM WSI series as a ZIP: unpacked, checked, a folder slide
            zipped, writer = writer, None
            series = await _store_series_zip(ctx, principal.tenant_id, zipped, mpp)
        else:
            with transaction(ctx.sessions) as s:
                existing = repo.find_slide_by_sha(s, principal.tenant_id, writer.sha256)
        if series is not None:
            slide, created = series
        elif existing is None:
            probed = await probe_slide(writer.path, mpp, settings)
            fmt = probed.get("format") or "unknown"
            slide = repo.new_slide(
                principal.tenant_id,
                sha256=writer.sha256,
                size_bytes=writer.size,
                fmt=fmt,
                mpp_override=mpp,
                info=probed.get("info") or {},
            )
            await run_in_threadpool(writer.commit, slide.blob_key)
            writer = None
            stored = repo.publish_slide(ctx.sessions, ctx.blobs, slide)
            created, slide = stored.id == slide.id, stored
            log.info("slide %s stored for tenant %s (%s, %d bytes)", slide.id, principal.tenant, fmt, slide.size_bytes)
        else:
            writer.discard()
            writer = None
            created, slide = False, existing
        ctx.metrics.uploads.labels("created" if created else "duplicate").inc()
    except BaseException as err:
        if writer is not None:
            writer.discard()
        code = getattr(err, "code", None)
        if code:
            ctx.metrics.uploads.labels(code).inc()
        raise

    if not analyze:
        return JSONResponse(
            slide_out(slide).model_dump(mode="json"),
            status_code=201 if created else 200,
            headers={"Location": f"/slides/{slide.id}"},
        )
    job = await run_in_threadpool(
        _queue, ctx, principal.tenant_id, slide, AnalysisRequest(mpp_override=mpp), idempotency_key
    )
    body = UploadAccepted(slide=slide_out(slide), job=job).model_dump(mode="json")
    return JSONResponse(body, status_code=202, headers={"Location": f"/jobs/{job.id}"})


async def _store_series_zip(ctx, tenant_id: str, zipped, mpp: float | None) -> tuple[Slide, bool]:
    """(slide, created) for a ZIP holding one DICOM WSI series (`service.dicom_series`): unpacked with size
    caps, checked from the headers (one series, whole-slide images), deduplicated by the series' content digest,
    opened by the probe process like any upload, then stored as a folder of instances. Consumes `zipped`."""
    settings = ctx.settings
    work = Path(tempfile.mkdtemp(dir=ctx.blobs.staging, prefix="series-"))
    staged = None
    try:
        folder = work / "files"
        await run_in_threadpool(dicom_series.unpack_zip, zipped.path, folder, max_bytes=settings.upload_max_bytes)
        zipped.discard()
        found = await run_in_threadpool(
            dicom_series.collect, folder, max_bytes=settings.upload_max_bytes, name="", what="ZIP archive"
        )
        staged = await run_in_threadpool(dicom_series.stage, ctx.blobs, found.files)
        sha, size = staged.sha256, staged.size
        with transaction(ctx.sessions) as s:
            existing = repo.find_slide_by_sha(s, tenant_id, sha)
        if existing is not None:
            return existing, False
        probed = await probe_slide(folder, mpp, settings)
        slide = repo.new_slide(
            tenant_id,
            sha256=sha,
            size_bytes=size,
            fmt=dicom_series.FORMAT,
            mpp_override=mpp,
            info={**(probed.get("info") or {}), "instances": len(found.files)},
        )
        await run_in_threadpool(staged.commit, slide.blob_key)
        stored = repo.publish_slide(ctx.sessions, ctx.blobs, slide)
        log.info("slide %s stored for tenant %s (DICOM series, %d instances)", stored.id, tenant_id, len(found.files))
        return stored, stored.id == slide.id
    finally:
        zipped.discard()
        if staged is not None:
            staged.discard()
        shutil.rmtree(work, ignore_errors=True)


def _copy_source(blobs, source: str, writer, max_bytes: int, allowed_buckets: list[str]) -> None:
    """A `source` field: the object is copied into the staged writer by the batch ingest's S3 code path, so the
    caller then treats it exactly as an uploaded file (dedup, probe, commit). The gateway reads with its own
    credentials, so a client may only name buckets the operator listed (`MSTAR_S3_SOURCE_BUCKETS`), and never the
    store's own prefix (that would copy another tenant's slide or results)."""
    from urllib.parse import urlparse

    from service.batch import copy_s3_source
    from service.errors import InvalidParameterError, SourceNotAllowedError

    parsed = urlparse(source)
    if parsed.scheme != "s3":
        raise InvalidParameterError(f"`source` must be an s3://bucket/key URI, got {source[:200]!r}")
    key = parsed.path.lstrip("/")
    own_bucket, own_prefix = getattr(blobs, "bucket", None), getattr(blobs, "prefix", "") or ""
    if parsed.netloc == own_bucket and (not own_prefix or key == own_prefix or key.startswith(own_prefix + "/")):
        raise SourceNotAllowedError(f"{source[:200]}: objects inside this service's own store cannot be sources")
    if own_bucket is not None and parsed.netloc not in allowed_buckets:
        raise SourceNotAllowedError(
            f"bucket {parsed.netloc!r} is not one clients may read; the operator lists those in MSTAR_S3_SOURCE_BUCKETS"
        )
    copy_s3_source(blobs, source, writer, max_bytes)
    writer.close()


def _queue(ctx, tenant_id: str, slide: Slide, req: AnalysisRequest, idempotency_key: str | None) -> JobOut:
    """Queue `req` on `slide`; the request digest kept with the key makes a reused key with another request a 422."""
    digest = repo.request_digest(slide=slide.id, **req.model_dump(mode="json")) if idempotency_key else None
    return job_out(ctx.submit(tenant_id, slide, req, idempotency_key=idempotency_key, request_sha256=digest).job)


@router.get("/slides", response_model=SlidePage, responses=ERRORS(401, 422), summary="List your slides")
def list_slides(
    principal: TenantDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
) -> SlidePage:
    rows, total = repo.list_slides(session, principal.tenant_id, limit=limit, offset=offset)
    return SlidePage.of([slide_out(r) for r in rows], total=total, limit=limit, offset=offset)


@router.get("/slides/{slide_id}", response_model=SlideOut, responses=ERRORS(401, 404))
def get_slide(slide_id: str, principal: TenantDep, session: SessionDep) -> SlideOut:
    slide = repo.get_slide(session, principal.tenant_id, slide_id)
    if slide is None:
        raise NotFoundError("no such slide")
    return slide_out(slide)


@router.delete(
    "/slides/{slide_id}",
    status_code=204,
    responses=ERRORS(401, 404),
    summary="Delete a slide with its jobs, results and files",
)
def delete_slide(slide_id: str, principal: TenantDep, ctx: ContextDep) -> Response:
    with transaction(ctx.sessions) as s:
        slide = repo.get_slide(s, principal.tenant_id, slide_id)
        if slide is None:
            raise NotFoundError("no such slide")
        key = slide.blob_key
        job_ids = repo.delete_slide(s, slide)
    ctx.blobs.delete(key)
    for job_id in job_ids:
        ctx.blobs.delete_prefix(f"results/{principal.tenant_id}/{job_id}")
    log.info("slide %s deleted with %d job(s)", slide_id, len(job_ids))
    return Response(status_code=204)


@router.post(
    "/slides/{slide_id}/analyses",
    status_code=202,
    response_model=JobOut,
    responses=ERRORS(401, 404, 422),
    summary="Queue an analysis of a stored slide",
)
def create_analysis(
    slide_id: str,
    principal: TenantDep,
    ctx: ContextDep,
    response: Response,
    req: Annotated[AnalysisRequest | None, Body()] = None,
    idempotency_key: IdemHeader = None,
) -> JobOut:
    with transaction(ctx.sessions) as s:
        slide = repo.get_slide(s, principal.tenant_id, slide_id)
        if slide is None:
            raise NotFoundError("no such slide")
    job = _queue(ctx, principal.tenant_id, slide, req or AnalysisRequest(), idempotency_key)
    response.headers["Location"] = f"/jobs/{job.id}"
    return job
