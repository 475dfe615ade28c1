"""Tenant-scoped lookups the result routes share (JSON result, features, heatmaps, GeoJSON, DICOM, FHIR)."""

from __future__ import annotations

from service.api.errors import NotFoundError, NotReadyError
from service.store import repo
from service.store.db import transaction
from service.store.models import Slide


def succeeded_files(ctx, tenant_id: str, job_id: str) -> tuple[dict, Slide | None]:
    """The files of the tenant's succeeded job and its slide (detached); 404 for no such job, 409 with the job's
    state (and error code) when it has not succeeded."""
    with transaction(ctx.sessions) as s:
        job = repo.get_job(s, tenant_id, job_id)
        if job is None:
            raise NotFoundError("no such job")
        if job.state != "succeeded":
            detail = f": {job.error_code}" if job.error_code else ""
            raise NotReadyError(f"job is {job.state}{detail}; results exist only for succeeded jobs")
        result = repo.get_result(s, tenant_id, job_id)
        files = dict((result.files if result is not None else {}) or {})
        slide = s.get(Slide, job.slide_id)
        if slide is not None:
            s.expunge(slide)
    return files, slide
