"""`/slides`: streamed upload (with an optional analysis), listing, lookup and deletion, all per tenant."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Body, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from service.api.deps import ContextDep, TenantDep
from service.api.errors import NotFoundError
from service.api.lookups import POLLS
from service.api.responses import ERRORS, UPLOAD_BODY
from service.api.rna_form import OPENAPI as RNA_FORM_OPENAPI
from service.api.rna_form import RnaFormRoute
from service.api.schemas import AnalysisRequest, JobOut, SlideOut, SlidePage, UploadAccepted
from service.api.views import job_out, slide_out
from service.errors import IdempotencyConflictError, InvalidParameterError
from service.ingest import check_same_mpp, find_job_by_key
from service.ingest.disk import disk_full_as_error
from service.ingest.ingestor import find_upload_key, forget_new_slide, record_upload_key, slide_ingestor
from service.ingest.multipart import parse_bool, parse_mpp, receive_upload
from service.ingest.slots import UploadSlots
from service.ingest.sources import check_client_source, copy_s3_source
from service.jobs import rna_channel
from service.store import repo
from service.store.db import transaction
from service.store.models import Slide

log = logging.getLogger("mstar.api")
router = APIRouter(tags=["slides"])

UNCAPPED = 1 << 62
ANALYSIS_BODY_MAX = 34 << 20  # an RNA profile file is at most rna_input.MAX_BYTES (32 MiB)
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
        **ERRORS(400, 401, 403, 404, 409, 413, 415, 422, 429, 503, 507),
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
    # A slot first (429 for this tenant, 503 for the process), then the body. Reading it uses no database
    # connection of this handler's; every database call after it runs on a worker thread, never the event loop.
    async with _upload_slots(request, ctx.settings).hold(principal.tenant_id):
        parsed = await receive_upload(request, ctx.blobs, ctx.settings)
        return await run_in_threadpool(_store_upload, ctx, principal, parsed, idempotency_key)


def _upload_slots(request: Request, settings) -> UploadSlots:
    slots = getattr(request.app.state, "upload_slots", None)
    if slots is None:
        slots = request.app.state.upload_slots = UploadSlots(settings.tenant_max_uploads, settings.max_uploads)
    return slots


def _store_upload(ctx, principal, parsed, idempotency_key: str | None) -> Response:
    """The received body through `service.ingest` (dedup, check, record, publish), then the analysis job."""
    settings = ctx.settings
    writer = parsed.writer
    try:
        source = parsed.fields.get("source")
        analyze = parse_bool(parsed.fields.get("analyze"), "analyze", True)
        if analyze:
            ctx.require_bundle()  # before anything is stored
        mpp = parse_mpp(parsed.fields.get("mpp_override"))
        if writer is None and source:
            check_client_source(ctx.blobs, source, settings.s3_source_buckets)
            writer = ctx.blobs.writer()
            with disk_full_as_error("copying the source into the store"):
                copy_s3_source(ctx.blobs, source, writer, settings.upload_max_bytes)
                writer.close()
        elif writer is None or source:
            raise InvalidParameterError(
                "send exactly one of the multipart part `file` (the slide) and the field `source` (an s3:// URI)"
            )
        ctx.metrics.upload_bytes.inc(writer.size)
        digest = None
        if idempotency_key:  # checked before anything is stored: a reused key never stores a new slide
            digest = repo.request_digest(
                route="POST /slides", sha256=writer.sha256, analyze=analyze, mpp_override=mpp, source=source
            )
            prior = find_job_by_key(ctx.sessions, principal.tenant_id, idempotency_key)
            if prior is not None:
                if prior.request_sha256 not in (None, digest):
                    raise _key_reused()
                writer.discard()
                return _replay(ctx, principal.tenant_id, prior)
            earlier = find_upload_key(ctx.sessions, principal.tenant_id, idempotency_key)
            if earlier is not None:  # the key of an upload that queued no job (analyze=false)
                if earlier.request_sha256 != digest:
                    raise _key_reused()
                writer.discard()
                return _replay_upload(ctx, principal.tenant_id, earlier.slide_id)
        staged, writer = writer, None
        got = slide_ingestor(ctx).from_writer(principal.tenant_id, staged, mpp=mpp)
        slide, created = got.slide, got.created
        if created:
            log.info(
                "slide %s stored for tenant %s (%s, %d bytes)",
                slide.id,
                principal.tenant,
                slide.format,
                slide.size_bytes,
            )
        elif not analyze:  # the same bytes with another µm/px: say so rather than keep the old one silently
            check_same_mpp(slide, mpp)
        ctx.metrics.uploads.labels("created" if created else "duplicate").inc()
    except BaseException as err:
        if writer is not None:
            writer.discard()
        code = getattr(err, "code", None)
        if code:
            ctx.metrics.uploads.labels(code).inc()
        raise

    if not analyze:
        # kept after the slide is stored: a concurrent upload with the same key and another file may win the
        # race past the check above, and then this one keeps nothing it stored
        if (
            idempotency_key
            and record_upload_key(ctx.sessions, principal.tenant_id, idempotency_key, digest, slide.id) != digest
        ):
            if created:
                forget_new_slide(ctx.sessions, ctx.blobs, principal.tenant_id, slide.id)
            raise _key_reused()
        return JSONResponse(
            slide_out(slide).model_dump(mode="json"),
            status_code=201 if created else 200,
            headers={"Location": f"/slides/{slide.id}"},
        )
    # the job carries this upload's µm/px (also for a slide stored earlier with another one)
    try:
        job = _queue(ctx, principal.tenant_id, slide, AnalysisRequest(mpp_override=mpp), idempotency_key, digest)
    except IdempotencyConflictError:  # a concurrent request took the key first (its job row won)
        if created:
            forget_new_slide(ctx.sessions, ctx.blobs, principal.tenant_id, slide.id)
        raise
    body = UploadAccepted(slide=slide_out(slide), job=job).model_dump(mode="json")
    return JSONResponse(body, status_code=202, headers={"Location": f"/jobs/{job.id}"})


def _key_reused() -> IdempotencyConflictError:
    return IdempotencyConflictError(
        "this Idempotency-Key was already used with a different upload (another file or other fields); use a new "
        "key for a new request"
    )


def _replay_upload(ctx, tenant_id: str, slide_id: str) -> Response:
    """The answer to a repeated `analyze=false` upload with the same Idempotency-Key and request: its slide."""
    with transaction(ctx.sessions) as s:
        slide = repo.get_slide(s, tenant_id, slide_id)
        if slide is None:
            raise NotFoundError("the slide this Idempotency-Key stored was deleted since")
        body = slide_out(slide).model_dump(mode="json")
    return JSONResponse(body, status_code=200, headers={"Location": f"/slides/{slide_id}"})


def _replay(ctx, tenant_id: str, job) -> Response:
    """The answer to a repeated upload with the same Idempotency-Key and request: the first job, nothing new."""
    with transaction(ctx.sessions) as s:
        slide = repo.get_slide(s, tenant_id, job.slide_id)
        if slide is None:
            raise NotFoundError("the slide of this Idempotency-Key's job was deleted; use a new key")
        body = UploadAccepted(slide=slide_out(slide), job=job_out(job)).model_dump(mode="json")
    return JSONResponse(body, status_code=202, headers={"Location": f"/jobs/{job.id}"})


def _queue(
    ctx,
    tenant_id: str,
    slide: Slide,
    req: AnalysisRequest,
    idempotency_key: str | None,
    request_sha256: str | None = None,
    rna: bytes | None = None,
) -> JobOut:
    """Queue `req` on `slide` through the job layer (`ServiceContext.submit`): the request digest kept with an
    Idempotency-Key makes a reused key with another request a 422; a tenant over its queued quota gets 429.
    `rna` (canonical profile bytes) goes through `service.jobs.rna_channel`; only its digest is recorded."""
    if idempotency_key and request_sha256 is None:
        extra = {"rna_sha256": rna_channel.digest(rna)} if rna is not None else {}
        request_sha256 = repo.request_digest(
            route="POST /slides/{id}/analyses",
            slide_id=slide.id,
            **req.model_dump(mode="json", exclude={"rna"}),
            **extra,
        )
    kwargs = {"rna": rna, "blobs": ctx.blobs} if rna is not None else {}
    return job_out(
        ctx.submit(tenant_id, slide, req, idempotency_key=idempotency_key, request_sha256=request_sha256, **kwargs).job
    )


@router.get("/slides", response_model=SlidePage, responses=ERRORS(401, 422), summary="List your slides")
def list_slides(
    principal: TenantDep,
    ctx: ContextDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
) -> SlidePage:
    with transaction(ctx.sessions) as s:
        rows, total = repo.list_slides(s, principal.tenant_id, limit=limit, offset=offset)
        return SlidePage.of([slide_out(r) for r in rows], total=total, limit=limit, offset=offset)


@router.get("/slides/{slide_id}", response_model=SlideOut, responses=ERRORS(401, 404))
def get_slide(slide_id: str, principal: TenantDep, ctx: ContextDep) -> SlideOut:
    with transaction(ctx.sessions) as s:
        slide = repo.get_slide(s, principal.tenant_id, slide_id)
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
    POLLS.forget(principal.tenant_id, job_ids)
    rna_channel.discard(ctx.blobs, job_ids)
    ctx.blobs.delete(key)
    for job_id in job_ids:
        ctx.blobs.delete_prefix(f"results/{principal.tenant_id}/{job_id}")
    log.info("slide %s deleted with %d job(s)", slide_id, len(job_ids))
    return Response(status_code=204)


def _region_on_slide(region: dict | list, slide: Slide) -> None:
    """A region off the slide is refused now (422), not when the job runs: the slide's size is known."""
    from service.results.roi import check_on_slide, parse_region

    dims = (slide.info or {}).get("level_dimensions") or []
    if dims and min(int(v) for v in dims[0]) > 0:  # a PACS slide's size is known only to its reader
        check_on_slide(parse_region(region), int(dims[0][0]), int(dims[0][1]))


def create_analysis(
    slide_id: str,
    principal: TenantDep,
    ctx: ContextDep,
    request: Request,
    response: Response,
    req: Annotated[AnalysisRequest | None, Body()] = None,
    idempotency_key: IdemHeader = None,
) -> JobOut:
    with transaction(ctx.sessions) as s:
        slide = repo.get_slide(s, principal.tenant_id, slide_id)
        if slide is None:
            raise NotFoundError("no such slide")
    req = req or AnalysisRequest()
    if req.region is not None:
        _region_on_slide(req.region, slide)
    rna = None
    rna_file = getattr(request.state, "rna_file", None)  # the multipart form (`service.api.rna_form`)
    if rna_file is not None and req.rna is not None:
        raise InvalidParameterError("send the RNA profile once: the multipart part `rna` or the JSON field `rna`")
    if rna_file is not None or req.rna is not None:
        from service.inference.rna_input import profile_from_lists, read_profile

        profile = read_profile(rna_file) if rna_file is not None else profile_from_lists(req.rna.genes, req.rna.values)
        ctx.require_bundle()  # a refused bundle is not one without an RNA head
        rna = rna_channel.prepare(ctx.bundle, profile)
    job = _queue(ctx, principal.tenant_id, slide, req, idempotency_key, rna=rna)
    response.headers["Location"] = f"/jobs/{job.id}"
    return job


router.add_api_route(
    "/slides/{slide_id}/analyses",
    create_analysis,
    methods=["POST"],
    status_code=202,
    response_model=JobOut,
    responses=ERRORS(401, 404, 413, 422, 429),
    max_body_size=ANALYSIS_BODY_MAX,  # room for a whole-transcriptome RNA profile, JSON or a file
    summary="Queue an analysis of a stored slide (optionally with an RNA-Seq profile, JSON or a file)",
    description=(
        "JSON: the analysis request, optionally with `rna: {genes, values}`. Or multipart/form-data: the part "
        "`rna` an RNA-Seq profile file (Gene,Value CSV/TSV, GDC STAR gene counts, TCGA RSEM) and the optional "
        "part `request` the JSON request's other fields. The profile is validated (size, finite numbers, gene "
        "identifiers, coverage of the bundle's genes) and held only until the job ends; a bundle without a "
        "slide + RNA head refuses it (422)."
    ),
    openapi_extra=RNA_FORM_OPENAPI,
    route_class_override=RnaFormRoute,
)
