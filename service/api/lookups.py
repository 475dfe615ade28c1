"""Tenant-scoped lookups the result routes share (JSON result, features, heatmaps, GeoJSON, DICOM, FHIR)."""

from __future__ import annotations

import threading
import time

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


class JobPolls:
    """The serialised `GET /jobs/{id}` answer for `ttl_s`: many clients polling one job share one database read.
    A cancel or a slide deletion forgets its jobs at once; anything else is at most `ttl_s` stale."""

    def __init__(self, ttl_s: float = 0.2, max_entries: int = 10_000) -> None:
        self.ttl_s, self.max_entries = ttl_s, max_entries
        self._items: dict[tuple[str, str], tuple[float, bytes]] = {}
        self._lock = threading.Lock()

    def get(self, tenant_id: str, job_id: str) -> bytes | None:
        hit = self._items.get((tenant_id, job_id))
        return hit[1] if hit is not None and hit[0] >= time.monotonic() else None

    def put(self, tenant_id: str, job_id: str, body: bytes) -> bytes:
        with self._lock:
            if len(self._items) >= self.max_entries:
                self._items.clear()
            self._items[(tenant_id, job_id)] = (time.monotonic() + self.ttl_s, body)
        return body

    def forget(self, tenant_id: str, job_ids: list[str]) -> None:
        with self._lock:
            for job_id in job_ids:
                self._items.pop((tenant_id, job_id), None)

    def forget_jobs(self, job_ids: list[str]) -> None:
        """Forget these jobs for every tenant (the embedded runner reports outcomes by job id)."""
        wanted = set(job_ids)
        with self._lock:
            for key in [k for k in self._items if k[1] in wanted]:
                del self._items[key]


POLLS = JobPolls()
