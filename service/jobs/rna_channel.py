"""The ephemeral channel that carries a request's RNA-Seq profile to the attempt that runs its job.

An RNA profile is patient data: it must never be in a job row, an audit event, a Celery message, a log line or a
result. The job row holds only `rna_sha256` (the digest of the normalised profile, so two requests that differ
only in RNA are never merged, and identical ones are); the profile itself is a blob `ephemeral/rna/<job id>` in
the blob store that every gateway and worker already reaches (files or S3), in the one canonical byte form of
`rna_input.canonical_bytes`. Any attempt of the job reads it (a retry after a lost worker too); it is deleted
when the job ends in any state (the attempt that ends it, or `sweep` for ends no attempt sees: a cancel while
queued, the reaper failing a silent job, a deleted slide), and `sweep` removes any such blob older than
`MSTAR_RNA_TTL_S` whatever its job's state, so an abandoned profile never outlives its TTL.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable
from contextlib import closing
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.errors import InvalidParameterError, MstarError
from service.store.blobs import BlobStore
from service.store.db import transaction
from service.store.models import TERMINAL_STATES, Job

log = logging.getLogger("mstar.jobs")

PREFIX = "ephemeral/rna"
OPTION = "rna_sha256"  # the only trace of a profile in a job row
ORPHAN_GRACE_S = 600.0  # a blob written for a job row that was never committed (a crash in between)


class RnaProfileGoneError(MstarError):
    """The job's RNA profile is no longer held (its TTL passed, or it was altered): the job cannot run."""

    code = "rna_expired"
    http_status = 422


def prepare(bundle: Any, profile: dict[str, float]) -> bytes:
    """A parsed profile checked against the served bundle (it must have a slide + RNA head, and the profile must
    cover enough of its genes) -> the canonical bytes the channel carries. Refusals are 422s that name no value."""
    from service.inference.rna_input import canonical_bytes, map_profile

    spec = getattr(getattr(bundle, "manifest", None), "rna_fusion", None)
    if spec is None:
        raise InvalidParameterError(
            "the served model bundle has no slide + RNA head (bundle.json has no rna_fusion); "
            "send the analysis without an RNA profile"
        )
    map_profile(profile, spec.genes)
    return canonical_bytes(profile)


def key_for(job_id: str) -> str:
    return f"{PREFIX}/{job_id}"


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put(blobs: BlobStore, job_id: str, data: bytes) -> None:
    """Hold `data` (canonical profile bytes) for job `job_id` until the job ends."""
    writer = blobs.writer()
    try:
        writer.write(data)
        writer.commit(key_for(job_id))
    except BaseException:
        writer.discard()
        raise


def read(blobs: BlobStore, job_id: str, sha256: str) -> bytes:
    """The profile of job `job_id`, checked against the digest its row holds (streamed, never cached on disk)."""
    try:
        with closing(blobs.open(key_for(job_id))) as fh:
            data = fh.read()
    except FileNotFoundError:
        data = None
    if data is None or digest(data) != sha256:
        raise RnaProfileGoneError(
            "the RNA profile of this job is no longer held (it outlived MSTAR_RNA_TTL_S or was removed); "
            "submit the analysis again with the profile"
        )
    return data


def discard(blobs: BlobStore, job_ids: Iterable[str]) -> None:
    """Delete the profiles of these (ended) jobs; a job without one costs one no-op delete."""
    for job_id in job_ids:
        try:
            blobs.delete(key_for(job_id))
        except (MstarError, OSError) as err:  # an outage: the sweep removes it later
            log.warning("job %s: could not remove its RNA profile yet: %s", job_id, type(err).__name__)


def sweep(sessions: sessionmaker[Session], blobs: BlobStore, *, ttl_s: float, now: float | None = None) -> int:
    """Remove every held profile whose job ended or is gone, and any older than `ttl_s`; returns how many."""
    now = time.time() if now is None else now
    held = {key.rsplit("/", 1)[-1]: mtime for key, mtime in blobs.list_prefix(PREFIX)}
    if not held:
        return 0
    states: dict[str, str] = {}
    ids = list(held)
    with transaction(sessions) as s:
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            states.update(dict(s.execute(select(Job.id, Job.state).where(Job.id.in_(chunk))).all()))
    gone = []
    for job_id, mtime in held.items():
        state = states.get(job_id)
        age = now - mtime
        if age > ttl_s or state in TERMINAL_STATES or (state is None and age > ORPHAN_GRACE_S):
            gone.append(job_id)
    discard(blobs, gone)
    if gone:
        log.info("removed %d RNA profile(s) of ended, deleted or expired jobs", len(gone))
    return len(gone)
