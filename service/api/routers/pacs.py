"""`/pacs`: analyses of slides that live in a hospital PACS, and the results in the forms a hospital reads
(DICOM objects, a FHIR DiagnosticReport). PACS servers are configuration (`MSTAR_PACS_SERVERS`): a request
names one, never an address.
"""

from __future__ import annotations

import io
import json
import logging
import zipfile
from typing import Annotated

from fastapi import APIRouter, Header
from fastapi.responses import Response
from pydantic import ConfigDict, Field

from service.api.deps import AdminDep, ContextDep, TenantDep
from service.api.errors import NotFoundError
from service.api.lookups import succeeded_files
from service.api.responses import ERRORS
from service.api.schemas import AnalysisRequest, JobOut
from service.api.views import job_out
from service.pacs.config import PacsSettings
from service.pacs.jobs import PACS_FORMAT, check_uid, job_key, slide_info, slide_key
from service.store import repo
from service.store.db import transaction

log = logging.getLogger("mstar.api")
router = APIRouter(tags=["pacs"])
UID = Field(min_length=1, max_length=64, pattern=r"^[0-9]+(\.[0-9]+)*$")


class PacsAnalysisRequest(AnalysisRequest):
    model_config = ConfigDict(extra="forbid")

    pacs: str = Field(min_length=1, max_length=64, description="name of a configured DICOMweb server")
    study_uid: Annotated[str, UID]
    series_uid: Annotated[str | None, UID] = Field(
        None, description="the slide series; may be left out when the study holds exactly one SM series"
    )
    # RNA with a PACS slide is not supported yet: a profile is refused (422) rather than silently ignored
    rna: None = Field(None, exclude=True, description="not supported for PACS analyses")


@router.get("/pacs/servers", responses=ERRORS(401, 403), summary="Configured PACS servers (admin; no secrets)")
def list_servers(principal: AdminDep) -> dict:
    servers = [s.public() for s in PacsSettings().all_servers() if s.tenant == principal.tenant]
    return {"servers": servers}


@router.post(
    "/pacs/analyses",
    status_code=202,
    response_model=JobOut,
    responses=ERRORS(401, 404, 409, 422),
    summary="Analyse a slide series stored in a configured PACS",
)
def create_pacs_analysis(
    req: PacsAnalysisRequest,
    principal: TenantDep,
    ctx: ContextDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255)] = None,
) -> JobOut:
    """One job per (server, study, series, options): a second trigger for the same series (the watcher, the
    Orthanc callback, a client retry) gets the first job back."""
    check_uid(req.study_uid, "study_uid")
    check_uid(req.series_uid, "series_uid")
    PacsSettings().server(principal.tenant, req.pacs)  # 404 unless configured for this tenant
    ctx.check_bundle_version(req.bundle_version)
    options = req.to_options()
    key = idempotency_key or job_key(req.pacs, req.study_uid, req.series_uid, options)
    with transaction(ctx.sessions) as s:
        sha = slide_key(req.pacs, req.study_uid, req.series_uid)
        slide = repo.find_slide_by_sha(s, principal.tenant_id, sha)
        if slide is None:
            slide = repo.add_slide(
                s,
                repo.new_slide(
                    principal.tenant_id,
                    sha256=sha,
                    size_bytes=0,
                    fmt=PACS_FORMAT,
                    mpp_override=req.mpp_override,
                    info=slide_info(req.pacs, req.study_uid, req.series_uid),
                ),
            )
    body = req.model_dump(mode="json")
    body["tasks"] = sorted(set(body["tasks"]))  # the same analysis whatever order the tasks are listed in
    digest = repo.request_digest(route="POST /pacs/analyses", **body)
    got = ctx.submit(principal.tenant_id, slide, req, idempotency_key=key, request_sha256=digest)
    if got.created:
        log.info("job %s queued for PACS slide %s", got.job.id, slide.id)
    return job_out(got.job)


def _job_files(ctx, principal, job_id: str) -> tuple[dict, dict]:
    files, slide = succeeded_files(ctx, principal.tenant_id, job_id)
    info = dict(slide.info or {}) if slide is not None and slide.format == PACS_FORMAT else {}
    return files, info


def _read(ctx, meta: dict) -> bytes:
    with ctx.blobs.open(meta["key"]) as fh:
        return fh.read()


@router.get(
    "/jobs/{job_id}/dicom",
    responses={
        200: {"content": {"application/zip": {}}, "description": "the DICOM result objects"},
        **ERRORS(401, 404, 409),
    },
    summary="The job's DICOM results (SR, segmentation, annotations) as a ZIP",
)
def get_dicom(job_id: str, principal: TenantDep, ctx: ContextDep) -> Response:
    files, _ = _job_files(ctx, principal, job_id)
    names = sorted(n for n in files if n.endswith(".dcm"))
    if not names:
        raise NotFoundError("this job produced no DICOM objects (only PACS analyses with a model bundle do)")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for n in names:
            zf.writestr(n, _read(ctx, files[n]))
    return Response(
        buf.getvalue(),
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{job_id}-dicom.zip"'},
    )


@router.get(
    "/jobs/{job_id}/fhir",
    responses={
        200: {"content": {"application/fhir+json": {}}, "description": "FHIR R4 DiagnosticReport"},
        **ERRORS(401, 404, 409),
    },
    summary="The job's result as an HL7 FHIR R4 DiagnosticReport (preliminary, AI draft)",
)
def get_fhir(job_id: str, principal: TenantDep, ctx: ContextDep) -> Response:
    from service.pacs.fhir import diagnostic_report

    files, info = _job_files(ctx, principal, job_id)
    if "result.json" not in files:
        raise NotFoundError("this job produced no result.json")
    result = json.loads(_read(ctx, files["result.json"]))
    report = diagnostic_report(job_id, result, study_uid=info.get("study_uid"), bundle_version=ctx.bundle_version)
    return Response(json.dumps(report), media_type="application/fhir+json")
