"""Queue an analysis: the one way a job is created from a request (REST analyses, uploads, PACS).

Checks what can be checked before anything is recorded (a webhook URL must be a public http(s) address unless
the deployment allows private ones, the asked bundle version must be served), refuses a reused Idempotency-Key
with a different request (422) and a tenant over its queued quota (429), and reuses identical work: the same
slide, bundle and options as a succeeded job takes its result at once (a new job row pointing at it), and as a
queued or running one waits for it, unless the caller asks for a `fresh` run.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from service import __version__
from service.config import Settings
from service.jobs import lifecycle, rna_channel
from service.jobs.protocol import JobQueue
from service.obs import tracing
from service.store.blobs import BlobStore
from service.store.db import transaction
from service.store.models import Job, new_id

log = logging.getLogger("mstar.jobs")

#: options that do not change what an analysis computes (so they do not split the reuse key)
_NOT_COMPUTED = {"batch_id", "bundle_version", "fresh", "reused_from"}


@dataclass(frozen=True)
class Submitted:
    job: Job
    created: bool


def cache_key(slide_sha256: str, bundle_version: str | None, options: dict, *, pipeline: str) -> str:
    """What makes two analyses identical: the slide's bytes, the served bundle (its manifest digest), the
    pipeline and service version that ran it, and the options that change the computation."""
    computed = {k: v for k, v in options.items() if k not in _NOT_COMPUTED}
    blob = json.dumps(
        [slide_sha256, bundle_version or "no-bundle", pipeline, __version__, computed],
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def submit_analysis(
    sessions: sessionmaker[Session],
    queue: JobQueue,
    settings: Settings,
    *,
    tenant_id: str,
    slide_id: str,
    slide_sha256: str,
    options: dict,
    bundle_version: str | None,
    idempotency_key: str | None = None,
    request_sha256: str | None = None,
    webhook_url: str | None = None,
    fresh: bool = False,
    rna: bytes | None = None,
    blobs: BlobStore | None = None,
) -> Submitted:
    """Record the job (or find the one this idempotency key made) and hand it to the queue when it must run.

    `rna` (canonical profile bytes, `rna_input.canonical_bytes`) travels through `rna_channel` in `blobs`: it is
    stored under the new job's id before the row exists (so no attempt can miss it), the row keeps only its
    digest (part of the reuse key), and it is dropped at once when no new job needs it (a replayed key, a
    reused result)."""
    if webhook_url:
        from service import webhooks

        webhooks.check_url(webhook_url, allow_private=settings.webhook_allow_private)
    new_id_ = None
    if rna is not None:
        if blobs is None:
            raise ValueError("an RNA profile needs the blob store that carries it")
        options = {**options, rna_channel.OPTION: rna_channel.digest(rna)}
        new_id_ = new_id()
        rna_channel.put(blobs, new_id_, rna)
    key = cache_key(slide_sha256, bundle_version, options, pipeline=settings.pipeline)
    try:
        job, created = _record(
            sessions,
            tenant_id=tenant_id,
            slide_id=slide_id,
            options=options,
            idempotency_key=idempotency_key,
            request_sha256=request_sha256,
            webhook_url=webhook_url,
            max_queued=settings.tenant_max_queued,
            cache_key=key,
            reuse=not fresh,
            job_id=new_id_,
        )
    except BaseException:
        if new_id_ is not None:
            rna_channel.discard(blobs, [new_id_])
        raise
    if new_id_ is not None and not (created and job.id == new_id_ and job.state == "queued"):
        rna_channel.discard(blobs, [new_id_])
    if created:
        if job.state == "queued" and job.follows is None:
            log.info("job %s queued for slide %s", job.id, slide_id)
            queue.notify(job.id)
        elif job.state == "queued":
            log.info("job %s follows identical job %s", job.id, job.follows)
        else:
            log.info("job %s reuses the result of %s", job.id, (job.options or {}).get("reused_from"))
            hook = getattr(queue, "job_terminal", None)
            if hook is not None:
                hook(job.id)
    return Submitted(job, created)


def _record(sessions: sessionmaker[Session], **create: Any) -> tuple[Job, bool]:
    """`lifecycle.create` in its own transaction, the row detached for the caller."""
    with transaction(sessions) as s:
        job, created = lifecycle.create(s, **create)
        if created and (trace_id := tracing.current_trace_id()):  # the worker continues it (Celery headers,
            job.trace_id = trace_id  # or the stored traceparent in the embedded pool's worker processes)
            job.trace_parent = tracing.current_traceparent()
            s.flush()
        s.expunge(job)
    return job, created
