"""Row -> response model conversions shared by the routers."""

from __future__ import annotations

from service.api.schemas import ErrorDetail, JobLinks, JobOut, SlideOut, WebhookStatus
from service.store.models import Job, Result, Slide


def slide_out(slide: Slide) -> SlideOut:
    return SlideOut(
        id=slide.id,
        sha256=slide.sha256,
        format=slide.format,
        size_bytes=slide.size_bytes,
        mpp_override=slide.mpp_override,
        info=slide.info or {},
        created_at=slide.created_at,
    )


def job_out(job: Job, result: Result | None = None) -> JobOut:
    links = JobLinks(self=f"/jobs/{job.id}", slide=f"/slides/{job.slide_id}")
    if job.state == "succeeded":
        files = (result.files if result is not None else {}) or {}
        links.result = f"/jobs/{job.id}/result"
        links.features = f"/jobs/{job.id}/features" if "features.h5" in files or result is None else None
        links.heatmap = f"/jobs/{job.id}/heatmap.png" if "heatmap.png" in files else None
        links.annotations = f"/jobs/{job.id}/annotations.geojson" if "patch_scores.h5" in files else None
        links.dicom = f"/jobs/{job.id}/dicom" if any(n.endswith(".dcm") for n in files) else None
    error = ErrorDetail(code=job.error_code, message=job.error_message or "") if job.error_code else None
    return JobOut(
        id=job.id,
        slide_id=job.slide_id,
        state=job.state,
        stage=job.stage,
        progress=job.progress or 0.0,
        error=error,
        attempts=job.attempts or 0,
        options=_public_options(job.options or {}),
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        stage_seconds={k: float(v) for k, v in (job.stage_seconds or {}).items()},
        webhook=_webhook_status(job),
        trace_id=job.trace_id,
        links=links,
    )


def _webhook_status(job: Job) -> WebhookStatus | None:
    if not job.webhook_url:
        return None
    if job.webhook_sent_at is not None:
        return WebhookStatus(state="done", delivered=job.webhook_delivered, sent_at=job.webhook_sent_at)
    return WebhookStatus(state="sending" if job.webhook_claimed_at is not None else "waiting")


def _public_options(options: dict) -> dict:
    """A job's options as its owner sees them: an RNA profile only as "given", not even its digest."""
    if "rna_sha256" not in options:
        return options
    return {**{k: v for k, v in options.items() if k != "rna_sha256"}, "rna_profile": "given (not stored)"}
