"""Batch jobs: a CSV manifest of slides becomes one batch of analysis jobs on the distributed workers.

Manifest: a CSV with a header and one slide per line. The slide column is `slide` (or `path`, `uri`, `source`,
`file`): a path (relative to the manifest; a DICOM WSI series folder too), a `file://` / `http(s)://` URI, or
`s3://bucket/key` with the S3 store. Optional columns: `id` (or `name`) as the display id, `mpp` (µm/px
override), `rna` (or `rna_file`): a local RNA-Seq profile file for the slide (relative to the manifest; any format
`rna_input.read_profile` reads) for the bundle's slide + RNA head, carried to the job by `service.jobs.rna_channel`
exactly like an API request's. Other columns are kept as item metadata and appear in the summary table.

`BatchService.submit` puts each slide through `service.ingest` (copied into the shared blob store, deduplicated by
SHA-256 per tenant, checked by the same out-of-process probe as an upload, with the same refusals), creates
one job per line and publishes it on the `batch` queue. The batch id is stable for one tenant and manifest path,
so submitting the same manifest again resumes it: succeeded lines are skipped, failed ones re-run, queued or
running ones re-published (duplicates are dropped by the workers' conditional claim).
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from service.config import Settings
from service.errors import InvalidParameterError, MstarError
from service.ingest import Ingestor
from service.ingest.sources import copy_s3_source  # noqa: F401  (moved there; old imports keep working)
from service.jobs import lifecycle, rna_channel
from service.jobs.resources import open_store
from service.store import repo
from service.store.batches import Batch, BatchItem
from service.store.db import transaction
from service.store.models import TERMINAL_STATES, Job, Result, new_id, utcnow

SOURCE_COLUMNS = ("slide", "path", "uri", "source", "file")
NAME_COLUMNS = ("id", "name", "slide_id")
MPP_COLUMNS = ("mpp", "mpp_override")
RNA_COLUMNS = ("rna", "rna_file")
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_ROWS = 100_000


@dataclass(frozen=True)
class ManifestRow:
    idx: int
    source: str
    name: str
    mpp_override: float | None = None
    meta: dict = field(default_factory=dict)
    rna: str | None = None  # a local RNA-Seq profile file (absolute path)


def parse_manifest(path: str | Path) -> list[ManifestRow]:
    """Read and check a manifest; raises `InvalidParameterError` naming the line of the first problem."""
    path = Path(path)
    if not path.is_file():
        raise InvalidParameterError(f"manifest {path} does not exist")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = {(h or "").strip().lower(): h for h in reader.fieldnames or []}
        col = next((header[c] for c in SOURCE_COLUMNS if c in header), None)
        if col is None:
            raise InvalidParameterError(
                f"manifest {path.name}: needs a column named one of {', '.join(SOURCE_COLUMNS)}"
            )
        name_col = next((header[c] for c in NAME_COLUMNS if c in header), None)
        mpp_col = next((header[c] for c in MPP_COLUMNS if c in header), None)
        rna_col = next((header[c] for c in RNA_COLUMNS if c in header), None)
        rows: list[ManifestRow] = []
        seen: dict[str, int] = {}
        for line, rec in enumerate(reader, start=2):
            raw = (rec.get(col) or "").strip()
            if not raw:
                continue
            source = _resolve(raw, path.parent)
            if source in seen:
                raise InvalidParameterError(f"manifest {path.name} line {line}: {raw!r} repeats line {seen[source]}")
            seen[source] = line
            mpp = None
            if mpp_col and (rec.get(mpp_col) or "").strip():
                try:
                    mpp = float(rec[mpp_col])
                except ValueError:
                    raise InvalidParameterError(
                        f"manifest {path.name} line {line}: mpp {rec[mpp_col]!r} is not a number"
                    ) from None
                if not 0.01 <= mpp <= 100:
                    raise InvalidParameterError(f"manifest {path.name} line {line}: mpp {mpp} is out of range")
            name = (rec.get(name_col) or "").strip() if name_col else ""
            rna = _rna_file(path, line, (rec.get(rna_col) or "").strip()) if rna_col else None
            skip = (col, name_col, mpp_col, rna_col)
            meta = {k: v for k, v in rec.items() if k and k not in skip and v not in (None, "")}
            rows.append(ManifestRow(len(rows), source, name or Path(urlparse(source).path).name, mpp, meta, rna))
            if len(rows) > MAX_ROWS:
                raise InvalidParameterError(f"manifest {path.name}: more than {MAX_ROWS} slides; split it")
    if not rows:
        raise InvalidParameterError(f"manifest {path.name} lists no slides")
    return rows


def _rna_file(manifest: Path, line: int, raw: str) -> str | None:
    """A line's RNA profile file: a local path (or file:// URI), relative to the manifest; empty = none."""
    if not raw:
        return None
    parsed = urlparse(raw)
    if parsed.scheme and len(parsed.scheme) > 1 and parsed.scheme != "file":
        raise InvalidParameterError(f"manifest {manifest.name} line {line}: an RNA file is a local path or file://")
    p = Path(unquote(parsed.path)) if parsed.scheme == "file" else Path(raw).expanduser()
    p = (p if p.is_absolute() else manifest.parent / p).resolve()
    if not p.is_file():
        raise InvalidParameterError(f"manifest {manifest.name} line {line}: RNA file {raw!r} does not exist")
    return str(p)


def _resolve(raw: str, base: Path) -> str:
    parsed = urlparse(raw)
    if parsed.scheme in ("http", "https", "s3"):
        return raw
    if parsed.scheme == "file":
        return str(Path(unquote(parsed.path)).resolve())
    if parsed.scheme and len(parsed.scheme) > 1:
        raise InvalidParameterError(
            f"unsupported URI scheme {parsed.scheme!r} in {raw!r} (use a path, file://, http(s)://, s3://)"
        )
    p = Path(raw).expanduser()
    return str((p if p.is_absolute() else base / p).resolve())


def _read_rna(bundle: Any, path: str) -> bytes:
    """A line's RNA file -> the canonical bytes the job will read (refusals name the row, never a value)."""
    from service.inference.rna_input import read_profile

    return rna_channel.prepare(bundle, read_profile(Path(path)))


def default_batch_id(tenant: str, manifest: str | Path) -> str:
    """Stable per tenant and manifest path, so a resubmission resumes the same batch."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"mstar-batch:{tenant}:{Path(manifest).resolve()}").hex


@dataclass
class SubmitReport:
    batch_id: str
    queued: list[str] = field(default_factory=list)  # job ids published now
    skipped_done: int = 0
    in_flight: int = 0
    failed_ingest: int = 0


def write_summary(out: Path, records: list[dict]) -> Path:
    """`out/summary.csv` of one row per line (columns in first-seen order; a Parquet copy where pyarrow is
    installed), the same for `--broker` and `--server` batches. Returns the CSV path."""
    columns = list(dict.fromkeys(k for r in records for k in r)) or ["idx"]
    csv_path = out / "summary.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, restval="")
        w.writeheader()
        w.writerows(records)
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return csv_path
    table = pa.Table.from_pylist(
        [{k: ("" if r.get(k) is None else str(r.get(k, ""))) for k in columns} for r in records]
    )
    pq.write_table(table, out / "summary.parquet")
    return csv_path


class _LineTaken(Exception):
    """A concurrent submit of the same batch gave the line its job first."""


NO_JOB = (
    "this line has no job: its slide was deleted, or a submit is still ingesting it or stopped before it had one; "
    "if no submit is running, submit the manifest again to run it"
)


@dataclass
class ItemStatus:
    idx: int
    name: str
    source: str
    state: str  # queued | running | succeeded | failed | canceled
    error_code: str | None
    reason: str | None
    job_id: str | None
    slide_id: str | None
    attempts: int
    stage: str | None
    progress: float
    seconds: float | None
    meta: dict


@dataclass
class BatchStatus:
    batch_id: str
    name: str
    items: list[ItemStatus]

    def counts(self) -> dict[str, int]:
        out = {"total": len(self.items), "queued": 0, "running": 0, "succeeded": 0, "failed": 0, "canceled": 0}
        for it in self.items:
            out[it.state] = out.get(it.state, 0) + 1
        out["remaining"] = out["queued"] + out["running"]
        return out

    @property
    def finished(self) -> bool:
        return all(it.state in TERMINAL_STATES for it in self.items)


class BatchService:
    """Batch submission, status and result gathering against the job store (needs database and blob access)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        store = open_store(settings)  # the process's one engine and blob store, as the gateway and workers use
        self.engine = store.engine
        self.sessions = store.sessions
        self.blobs = store.blobs
        self.ingestor = Ingestor(self.sessions, self.blobs, settings)
        self._patches: dict[str, int] = {}

    def close(self) -> None:
        """Release pooled connections (the engine stays usable: it is shared with the rest of the process)."""
        self.engine.dispose()

    # --- submit -------------------------------------------------------------------------------------------

    def submit(
        self,
        manifest: str | Path,
        *,
        tenant: str = "default",
        batch_id: str | None = None,
        options: dict | None = None,
        queue: Any = None,
    ) -> SubmitReport:
        """Create/resume the batch and its jobs; publish them with `queue.notify(job_id, queue="batch")`."""
        rows = parse_manifest(manifest)
        bundle = self._rna_bundle() if any(r.rna for r in rows) else None
        batch_id = batch_id or default_batch_id(tenant, manifest)
        if not re.fullmatch(r"[0-9a-f]{32}", batch_id):
            raise InvalidParameterError("a batch id is 32 lowercase hex characters")
        options = dict(options or {})
        with transaction(self.sessions) as s:
            tenant_row = repo.ensure_tenant(s, tenant)
            tenant_id = tenant_row.id
            batch = s.get(Batch, batch_id)
            if batch is None:
                s.add(Batch(id=batch_id, tenant_id=tenant_id, name=Path(manifest).name, options=options))
            elif batch.tenant_id != tenant_id:
                raise InvalidParameterError(f"batch {batch_id} belongs to another tenant")
            else:
                batch.submitted_at = utcnow()
            items = {it.source: it for it in s.scalars(select(BatchItem).where(BatchItem.batch_id == batch_id))}
        report = SubmitReport(batch_id)
        next_idx = max((it.idx for it in items.values()), default=-1) + 1
        republish: list[str] = []
        for row in rows:
            with transaction(self.sessions) as s:
                item = s.get(BatchItem, (batch_id, items[row.source].idx)) if row.source in items else None
                job = s.get(Job, item.job_id) if item is not None and item.job_id else None
                if job is not None and job.state == "succeeded":
                    report.skipped_done += 1
                    continue
                if job is not None and job.state in ("queued", "running"):
                    report.in_flight += 1
                    if job.state == "queued":
                        republish.append(job.id)
                    continue
                if item is None:
                    item = BatchItem(
                        batch_id=batch_id, idx=next_idx, source=row.source, name=row.name[:255], meta=row.meta
                    )
                    next_idx += 1
                    s.add(item)
                    try:
                        s.flush()
                    except IntegrityError:  # was a raw traceback
                        raise InvalidParameterError(
                            f"another submit of batch {batch_id} is adding lines right now: let it finish, then "
                            "submit again to pick up anything it left"
                        ) from None
                item_key, prior_job = (batch_id, item.idx), item.job_id
            try:
                rna = _read_rna(bundle, row.rna) if row.rna else None
                slide_id = self._ingest(tenant_id, row)
            except MstarError as err:
                with transaction(self.sessions) as s:
                    item = s.get(BatchItem, item_key)
                    item.job_id, item.error_code, item.error_message = None, err.code, str(err)
                report.failed_ingest += 1
                continue
            job_options = {**options, "batch_id": batch_id}
            if row.mpp_override is not None:
                job_options["mpp_override"] = row.mpp_override
            job_id = new_id()
            if rna is not None:  # held for the job before its row exists (see `rna_channel`)
                job_options[rna_channel.OPTION] = rna_channel.digest(rna)
                rna_channel.put(self.blobs, job_id, rna)
            try:
                with transaction(self.sessions) as s:
                    new_job, _ = lifecycle.create(
                        s, tenant_id=tenant_id, slide_id=slide_id, options=job_options, job_id=job_id
                    )
                    # the line's job only if no concurrent submit gave it one meanwhile (each made a job, and one
                    # of them ran untracked); losing rolls this job back with the transaction
                    same = BatchItem.job_id.is_(None) if prior_job is None else BatchItem.job_id == prior_job
                    won = s.execute(
                        update(BatchItem)
                        .where(BatchItem.batch_id == batch_id, BatchItem.idx == item_key[1], same)
                        .values(slide_id=slide_id, job_id=new_job.id, error_code=None, error_message=None)
                        .execution_options(synchronize_session=False)
                    ).rowcount
                    if won != 1:
                        raise _LineTaken
                    report.queued.append(new_job.id)
            except _LineTaken:
                if rna is not None:
                    rna_channel.discard(self.blobs, [job_id])
                report.in_flight += 1
            except BaseException:
                if rna is not None:
                    rna_channel.discard(self.blobs, [job_id])
                raise
        if queue is not None:
            for job_id in [*report.queued, *republish]:
                queue.notify(job_id, queue="batch")
        return report

    def _rna_bundle(self) -> Any:
        """The configured bundle, which must have a slide + RNA head when a manifest names RNA files."""
        if self.settings.bundle_dir is None:
            raise InvalidParameterError(
                "the manifest names RNA files, but no model bundle is configured (MSTAR_BUNDLE_DIR) to check them"
            )
        from service.inference.bundle import load_bundle

        bundle = load_bundle(self.settings.bundle_dir)
        if bundle.manifest.rna_fusion is None:
            raise InvalidParameterError(
                "the manifest names RNA files, but the model bundle has no slide + RNA head (no rna_fusion)"
            )
        return bundle

    def _ingest(self, tenant_id: str, row: ManifestRow) -> str:
        """The line's slide through `service.ingest` (the same dedup, check and refusals as an upload); its id."""
        got = self.ingestor.from_source(
            tenant_id, row.source, mpp=row.mpp_override, name=row.name, info={"batch_name": row.name[:255]}
        )
        return got.slide.id

    # --- status and results ---------------------------------------------------------------------------------

    def status(self, batch_id: str, *, tenant: str | None = None) -> BatchStatus:
        with transaction(self.sessions) as s:
            batch = s.get(Batch, batch_id)
            if batch is None or (tenant is not None and repo.ensure_tenant(s, tenant).id != batch.tenant_id):
                raise InvalidParameterError(f"no batch {batch_id}")
            rows = s.execute(
                select(BatchItem, Job)
                .outerjoin(Job, Job.id == BatchItem.job_id)
                .where(BatchItem.batch_id == batch_id)
                .order_by(BatchItem.idx)
            ).all()
            items = []
            for item, job in rows:
                if job is None:
                    # no job and no error: the submit adding the line stopped (killed mid-ingest), or its job went
                    # with its slide. It read "queued" for ever, and `mstar submit --wait` never returned.
                    code, message = item.error_code, item.error_message
                    if not code:
                        code, message = "no_job", NO_JOB
                    items.append(
                        ItemStatus(
                            item.idx,
                            item.name,
                            item.source,
                            "failed",
                            code,
                            message,
                            None,
                            item.slide_id,
                            0,
                            None,
                            0.0,
                            None,
                            dict(item.meta or {}),
                        )
                    )
                    continue
                secs = None
                if job.started_at and job.finished_at:
                    secs = round((job.finished_at - job.started_at).total_seconds(), 3)
                items.append(
                    ItemStatus(
                        item.idx,
                        item.name,
                        item.source,
                        job.state,
                        job.error_code,
                        job.error_message,
                        job.id,
                        item.slide_id,
                        job.attempts or 0,
                        job.stage,
                        float(job.progress or 0.0),
                        secs,
                        dict(item.meta or {}),
                    )
                )
            return BatchStatus(batch_id, batch.name, items)

    def patches(self, item: ItemStatus) -> int | None:
        """Patches the job tiled (from its result.json; cached)."""
        if item.state != "succeeded" or item.job_id is None:
            return None
        if item.job_id not in self._patches:
            result = self._result_json(item.job_id)
            n = (result.get("tiling") or {}).get("patches", result.get("n_patches"))
            self._patches[item.job_id] = int(n) if isinstance(n, int | float) else 0
        return self._patches[item.job_id]

    def _files(self, job_id: str) -> dict:
        with transaction(self.sessions) as s:
            row = s.get(Result, job_id)
            return dict(row.files) if row is not None else {}

    def _result_json(self, job_id: str) -> dict:
        meta = self._files(job_id).get("result.json")
        if not meta or not self.blobs.exists(meta["key"]):
            return {}
        with self.blobs.open(meta["key"]) as fh:
            return json.load(fh)

    def results(self, batch_id: str, out_dir: str | Path, *, tenant: str | None = None) -> Path:
        """Copy each succeeded slide's features into `out_dir/features/` and write the summary table.

        Returns the CSV path; a Parquet copy is written too when pyarrow is installed."""
        status = self.status(batch_id, tenant=tenant)
        out = Path(out_dir)
        (out / "features").mkdir(parents=True, exist_ok=True)
        records = []
        for item in status.items:
            features = ""
            if item.state == "succeeded" and item.job_id:
                meta = self._files(item.job_id).get("features.h5")
                if meta and self.blobs.exists(meta["key"]):
                    dest = out / "features" / f"{item.idx:05d}_{_SAFE.sub('_', item.name)[:80]}.h5"
                    tmp = dest.with_suffix(".h5.part")
                    with self.blobs.open(meta["key"]) as src, tmp.open("wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                    tmp.replace(dest)
                    features = str(dest.relative_to(out))
            records.append(
                {
                    "idx": item.idx,
                    "name": item.name,
                    "source": item.source,
                    "state": item.state,
                    "error_code": item.error_code or "",
                    "reason": item.reason or "",
                    "attempts": item.attempts,
                    "n_patches": self.patches(item) if item.state == "succeeded" else "",
                    "seconds": item.seconds if item.seconds is not None else "",
                    "features": features,
                    "job_id": item.job_id or "",
                    "slide_id": item.slide_id or "",
                    **{f"meta_{k}": v for k, v in item.meta.items()},
                }
            )
        return write_summary(out, records)

    def iter_until_done(self, batch_id: str, poll_s: float = 1.0) -> Iterator[BatchStatus]:
        """Yield the batch status every `poll_s` until every item is terminal (the caller may stop early)."""
        import time

        while True:
            st = self.status(batch_id)
            yield st
            if st.finished:
                return
            time.sleep(poll_s)
