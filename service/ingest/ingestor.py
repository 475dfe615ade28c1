"""One path from any source to a recorded slide: stage -> dedup -> check -> record -> publish.

Every source (the multipart body of `POST /slides`, its `source` field, a batch manifest line naming a file, an
http(s) URL, an s3:// object or a DICOM series folder, a ZIP of a series) ends here with its bytes staged, and
gets the same treatment:

- **dedup**: the tenant's slide with the same content digest is returned as is (nothing stored twice);
- **check**: the slide is opened by the out-of-process probe (`service.ingest.probe`), never in this process;
- **record + publish**: the bytes are committed under the slide's key, then the row is inserted; an identical
  upload that won a race meanwhile keeps its slide and this copy's blob is removed (`repo.publish_slide`).

Failures are typed (the same code for the same problem from every source, e.g. 413 `slide_too_large`), a full
disk is 507 `storage_full`, and staging files are removed whatever happens. Blocking: run it on a worker thread.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.errors import MstarError, UnsupportedFormatError
from service.ingest import series as dicom_series
from service.ingest.disk import disk_full_as_error
from service.ingest.probe import check_slide
from service.ingest.sources import fetch
from service.slides.sniff import is_dicom_file
from service.store import repo
from service.store.blobs import BlobStore, BlobWriter
from service.store.db import transaction
from service.store.models import Job, Slide, UploadKey

SINGLE_DICOM = (
    "one DICOM file is one instance of a series: send the whole series (its folder on the manifest line, "
    "or a ZIP of the folder as the upload)"
)


class SlideConflictError(MstarError):
    """The request contradicts what is stored for these bytes (e.g. another µm/px than the stored override)."""

    code = "slide_conflict"
    http_status = 409


@dataclass(frozen=True)
class Ingested:
    slide: Slide
    created: bool  # False: the tenant already had these bytes (or an identical upload won the race)


class Ingestor:
    """Runs the ingest path against one store (its sessions, blob store and limits)."""

    def __init__(self, sessions: sessionmaker[Session], blobs: BlobStore, settings: Settings) -> None:
        self.sessions, self.blobs, self.settings = sessions, blobs, settings

    @property
    def max_bytes(self) -> int:
        return self.settings.upload_max_bytes

    # --- sources --------------------------------------------------------------------------------------------

    def from_source(self, tenant_id: str, source: str, *, mpp: float | None, name: str, info: dict) -> Ingested:
        """A path (a file, or a DICOM series folder), `http(s)://` URL or `s3://` URI (batch manifest lines)."""
        if not urlparse(source).scheme and Path(source).is_dir():
            found = dicom_series.collect(Path(source), max_bytes=self.max_bytes, name=name)
            return self._from_series(tenant_id, found, Path(source), mpp=mpp, info=info, name=name)
        writer = self.blobs.writer()
        try:
            with disk_full_as_error("copying the slide into the store"):
                fetch(source, writer, max_bytes=self.max_bytes, blobs=self.blobs)
        except BaseException:
            writer.discard()
            raise
        return self.from_writer(tenant_id, writer, mpp=mpp, info=info, name=name)

    def from_writer(
        self, tenant_id: str, writer: BlobWriter, *, mpp: float | None, info: dict | None = None, name: str = ""
    ) -> Ingested:
        """Staged bytes (an upload, a fetched source): a ZIP is one DICOM series, anything else one slide file.
        Consumes `writer`: it is committed into the store or discarded."""
        info = dict(info or {})
        try:
            with disk_full_as_error("storing the slide"):
                writer.close()
                if dicom_series.is_zip(writer.path):
                    return self._from_zip(tenant_id, writer, mpp=mpp, info=info, name=name)
                if is_dicom_file(writer.path):  # the magic only: nothing is parsed in this process
                    raise UnsupportedFormatError(SINGLE_DICOM, slide=name or None)
                existing = self.find(tenant_id, writer.sha256)
                if existing is not None:
                    return Ingested(existing, False)
                # the same bytes arriving together (20 clients uploading one slide) are checked and stored once;
                # the others wait and find the stored slide
                with _one_at_a_time((tenant_id, writer.sha256)):
                    existing = self.find(tenant_id, writer.sha256)
                    if existing is not None:
                        return Ingested(existing, False)
                    probed = check_slide(writer.path, mpp, self.settings)
                    slide = repo.new_slide(
                        tenant_id,
                        sha256=writer.sha256,
                        size_bytes=writer.size,
                        fmt=probed.get("format") or "unknown",
                        mpp_override=mpp,
                        info={**(probed.get("info") or {}), **info},
                    )
                    writer.commit(slide.blob_key)
                    return self._publish(slide)
        finally:
            writer.discard()  # a no-op once committed

    def _from_zip(self, tenant_id: str, zipped: BlobWriter, *, mpp: float | None, info: dict, name: str) -> Ingested:
        """A ZIP holding one DICOM WSI series: unpacked with size caps into staging, checked from the headers
        (one series, whole-slide images), then like a series folder."""
        work = Path(tempfile.mkdtemp(dir=self.blobs.staging, prefix="series-"))
        try:
            folder = work / "files"
            dicom_series.unpack_zip(zipped.path, folder, max_bytes=self.max_bytes)
            zipped.discard()
            found = dicom_series.collect(folder, max_bytes=self.max_bytes, name=name, what="ZIP archive")
            return self._from_series(tenant_id, found, folder, mpp=mpp, info=info, name=name)
        finally:
            zipped.discard()
            shutil.rmtree(work, ignore_errors=True)

    def _from_series(
        self, tenant_id: str, found: dicom_series.Series, folder: Path, *, mpp: float | None, info: dict, name: str
    ) -> Ingested:
        """A checked DICOM WSI series: staged (hashed), deduplicated by the series digest (the same series is one
        slide however it arrived), probed, then stored as a folder of instances."""
        with disk_full_as_error("storing the DICOM series"):
            staged = dicom_series.stage(self.blobs, found.files)
            try:
                existing = self.find(tenant_id, staged.sha256)
                if existing is not None:
                    return Ingested(existing, False)
                probed = check_slide(folder, mpp, self.settings)
                slide = repo.new_slide(
                    tenant_id,
                    sha256=staged.sha256,
                    size_bytes=staged.size,
                    fmt=dicom_series.FORMAT,
                    mpp_override=mpp,
                    info={**(probed.get("info") or {}), "instances": len(found.files), **info},
                )
                staged.commit(slide.blob_key)
            finally:
                staged.discard()
            return self._publish(slide)

    # --- store ----------------------------------------------------------------------------------------------

    def find(self, tenant_id: str, sha256: str) -> Slide | None:
        with transaction(self.sessions) as s:
            return repo.find_slide_by_sha(s, tenant_id, sha256)

    def _publish(self, slide: Slide) -> Ingested:
        stored = repo.publish_slide(self.sessions, self.blobs, slide)
        return Ingested(stored, stored.id == slide.id)


_FLIGHTS: dict[tuple[str, str], threading.Lock] = {}
_FLIGHTS_LOCK = threading.Lock()


@contextmanager
def _one_at_a_time(key: tuple[str, str]) -> Iterator[None]:
    """One ingest at a time per (tenant, content digest) in this process."""
    with _FLIGHTS_LOCK:
        lock = _FLIGHTS.setdefault(key, threading.Lock())
    try:
        with lock:
            yield
    finally:
        with _FLIGHTS_LOCK:
            if not lock.locked():
                _FLIGHTS.pop(key, None)


def find_job_by_key(sessions: sessionmaker[Session], tenant_id: str, key: str) -> Job | None:
    """The tenant's job created with this Idempotency-Key, if any (checked before anything is stored)."""
    with transaction(sessions) as s:
        return s.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key))


def find_upload_key(sessions: sessionmaker[Session], tenant_id: str, key: str) -> UploadKey | None:
    """The tenant's upload that queued no job under this Idempotency-Key (`analyze=false`), if any."""
    with transaction(sessions) as s:
        return s.get(UploadKey, (tenant_id, key))


def record_upload_key(sessions: sessionmaker[Session], tenant_id: str, key: str, digest: str, slide_id: str) -> str:
    """Keep `key` for an upload that queued no job; the digest kept under it (another request's, where a
    concurrent one with the same key recorded first)."""
    try:
        with transaction(sessions) as s:
            s.add(UploadKey(tenant_id=tenant_id, idempotency_key=key, request_sha256=digest, slide_id=slide_id))
        return digest
    except IntegrityError:
        kept = find_upload_key(sessions, tenant_id, key)
        return kept.request_sha256 if kept is not None else digest


def forget_new_slide(sessions: sessionmaker[Session], blobs: BlobStore, tenant_id: str, slide_id: str) -> None:
    """Remove a slide this request stored before its Idempotency-Key turned out to be taken by another request
    (two concurrent uploads with one key): the refused request keeps nothing. Left alone if a job or a kept key
    refers to it meanwhile."""
    with transaction(sessions) as s:
        slide = repo.get_slide(s, tenant_id, slide_id)
        used = s.scalar(select(Job.id).where(Job.slide_id == slide_id).limit(1)) or s.scalar(
            select(UploadKey.slide_id).where(UploadKey.slide_id == slide_id).limit(1)
        )
        if slide is None or used:
            return
        key = slide.blob_key
        repo.delete_slide(s, slide)
    blobs.delete(key)


def check_same_mpp(slide: Slide, mpp: float | None) -> None:
    """The same bytes uploaded again with another `mpp_override` than the stored one: refused with the stored
    value (an analysis can still use the new one: it goes into the job's options)."""
    if mpp is None or (slide.mpp_override is not None and abs(slide.mpp_override - mpp) < 1e-9):
        return
    stored = (
        f"mpp_override={slide.mpp_override:g} µm/px"
        if slide.mpp_override is not None
        else "no mpp_override (the slide's own µm/px)"
    )
    raise SlideConflictError(
        f"this slide is already stored with {stored}, not {mpp:g}; the stored value is kept. To analyse it at "
        f"{mpp:g} µm/px, upload with analyze=true or POST /slides/{slide.id}/analyses with mpp_override"
    )


def slide_ingestor(ctx: Any) -> Ingestor:
    """The ingestor of a gateway's `ServiceContext` (its sessions, blob store and settings)."""
    return Ingestor(ctx.sessions, ctx.blobs, ctx.settings)
