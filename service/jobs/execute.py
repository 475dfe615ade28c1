"""Run one claimed job end to end in the current process: the embedded worker processes and the Celery task both
call `execute_job` with the `Lease` their claim returned.

It opens the stored slide, runs the pipeline (`service.pipeline.run_analysis` unless settings name another),
writes progress through `lifecycle.progress`, honours cancel, publishes the output files under this attempt's own
blob prefix and records the verdict through `lifecycle`. Every write is fenced by the lease: an attempt that has
lost its job (its gateway died and a new attempt took over, a sweep requeued it, the slide was deleted) stops at
its next write and removes only its own files, never what the winning attempt published.

The model bundle and backend are opened once per process (`worker_backend`) and reused by every job it runs.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import shutil
import socket
import time
import traceback
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.exc import DBAPIError

from service.config import Settings
from service.errors import MstarError, SlideNotFoundError, StorageFullError, is_disk_full
from service.jobs import lifecycle, rna_channel
from service.jobs.lifecycle import Lease
from service.jobs.resources import open_store
from service.obs import tracing
from service.obs.context import bind_log_context, log_context
from service.store.blobs import scratch_dir
from service.store.db import db_full, transaction
from service.store.models import Job, Slide

log = logging.getLogger("mstar.jobs")

PipelineFn = Callable[..., dict]
MAX_TIMED_CALLS = 20_000  # backend latencies kept per model and job (a bound on what an outcome carries)
PROGRESS_WRITE_S = 0.5  # at most this often a progress write / cancel poll hits the database


@dataclass
class JobOutcome:
    """What a finished execution reports back (metrics, webhooks, dispatch). Never holds PHI.

    `state` is "lost" when the attempt no longer owned the job by the time it finished (nothing recorded)."""

    job_id: str
    state: str
    error_code: str | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    n_patches: int | None = None
    followers_done: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)  # followers that must now run themselves
    backend_seconds: dict[str, list[float]] = field(default_factory=dict)  # model -> seconds per call (metrics)

    @property
    def terminal_ids(self) -> list[str]:
        """Jobs this execution made terminal (their webhooks are due)."""
        own = [self.job_id] if self.state in ("succeeded", "failed", "canceled") else []
        return own + self.followers_done


class LeaseLost(Exception):
    """This attempt no longer owns its job: stop, record nothing, remove only this attempt's files."""


def options_from_record(options: dict, rna: bytes | None = None) -> Any:
    """The stored job options as the pipeline's `AnalysisOptions` (with the RNA profile `rna_channel` held)."""
    from service.pipeline import AnalysisOptions

    extra = dict(options.get("extra") or {})
    if options.get("bundle_version"):
        extra["bundle_version"] = options["bundle_version"]
    kwargs: dict[str, Any] = {"extra": extra}
    if options.get("tasks"):
        kwargs["tasks"] = tuple(options["tasks"])
    if options.get("prompts"):
        kwargs["prompts"] = tuple(options["prompts"])
    if options.get("mpp_override") is not None:
        kwargs["mpp_override"] = float(options["mpp_override"])
    if options.get("region") is not None:
        kwargs["region"] = options["region"]
    if rna is not None:
        kwargs["rna"] = rna
    return AnalysisOptions(**kwargs)


def load_callable(spec: str | PipelineFn) -> PipelineFn:
    if callable(spec):
        return spec
    module, _, name = spec.partition(":")
    fn = getattr(importlib.import_module(module), name, None)
    if fn is None or not callable(fn):
        raise ImportError(f"pipeline {spec!r} not found")
    return fn


# --- per-process model backend --------------------------------------------------------------------------------

_BACKENDS: dict[tuple[int, str], Any] = {}


def worker_backend(settings: Settings) -> Any | None:
    """The bundle's backend for this process, opened (and its checksums verified) once, then reused by every job;
    None without a configured bundle. A bundle that cannot be served raises `BundleError` (the job fails)."""
    if settings.bundle_dir is None:
        return None
    key = (os.getpid(), str(settings.bundle_dir))
    if key not in _BACKENDS:
        from service.inference.bundle import load_bundle
        from service.pipeline import open_backend

        bundle = load_bundle(settings.bundle_dir, verify_checksums=True)
        if settings.backend == "triton":
            backend = open_backend(bundle, "triton", url=settings.triton_url, protocol=settings.triton_protocol)
        else:
            backend = open_backend(bundle, "onnxruntime", device=settings.ort_device)
        _BACKENDS[key] = backend
    return _BACKENDS[key]


# --- scratch space --------------------------------------------------------------------------------------------


def scratch_prefix(job_id: str) -> str:
    """Scratch folders name their job, host and process, so a sweep can tell a live one from a dead one's."""
    return f"job-{job_id}-{socket.gethostname()}-{os.getpid()}-"


def sweep_scratch(work_dir: Path, *, job_id: str | None = None) -> int:
    """Remove scratch folders of this host's dead processes (all of a job's with `job_id`): a killed run leaves
    its folder behind, and nothing else would ever remove it."""
    if not work_dir.is_dir():
        return 0
    host = socket.gethostname()
    removed = 0
    for path in work_dir.glob(f"job-{job_id or '*'}-*"):
        parts = path.name.split("-")
        pid = parts[-2] if len(parts) >= 5 else ""
        owner_host = "-".join(parts[2:-2])
        if job_id is None and (owner_host != host or not pid.isdigit() or _alive(int(pid))):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _find_int(result: dict, *names: str) -> int | None:
    for container in (result, result.get("tiling") or {}, result.get("features") or {}, result.get("timings") or {}):
        if isinstance(container, dict):
            for n in names:
                v = container.get(n)
                if isinstance(v, int | float) and not isinstance(v, bool):
                    return int(v)
    return None


def job_tenant_name(s: Any, tenant_id: str) -> str:
    from service.store.models import Tenant

    tenant = s.get(Tenant, tenant_id)
    return tenant.name if tenant is not None else ""


def _no_space(err: BaseException) -> bool:
    return is_disk_full(err, also=db_full)


# --- one job --------------------------------------------------------------------------------------------------


def execute_job(lease: Lease, settings: Settings, pipeline: str | PipelineFn | None = None) -> JobOutcome:
    """Run the job `lease` owns to a terminal state (or stop once it is lost). Safe in any worker process.

    Every log line meanwhile names the job (and its tenant once read)."""
    with (
        log_context(job_id=lease.job_id, tenant=None),
        tracing.span(
            "mstar.job", parent=lease.trace_parent, **{"mstar.job_id": lease.job_id, "mstar.attempt": lease.attempt}
        ) as span,
    ):
        outcome = _execute(lease, settings, pipeline)
        if span is not None:
            span.set_attribute("mstar.state", outcome.state)
        return outcome


def _execute(lease: Lease, settings: Settings, pipeline: str | PipelineFn | None) -> JobOutcome:
    store = open_store(settings)
    factory, blobs = store.sessions, store.blobs
    job_id = lease.job_id
    with transaction(factory) as s:
        job = s.get(Job, job_id)
        slide = s.get(Slide, job.slide_id) if job is not None else None
        if job is None or slide is None or not lifecycle.still_owned(s, lease):
            return JobOutcome(job_id, "lost")
        tenant_id, options_rec = job.tenant_id, dict(job.options or {})
        bind_log_context(tenant=tenant_id)
        if options_rec.get("mpp_override") is None and slide.mpp_override is not None:
            options_rec["mpp_override"] = slide.mpp_override
        blob_key = slide.blob_key
        pacs_info = dict(slide.info or {}) if slide.format == "pacs" else None  # a slide that lives in a PACS
        tenant_name = job_tenant_name(s, tenant_id) if pacs_info is not None else None
        if job.cancel_requested:
            done = lifecycle.finish(s, lease, "canceled", error_code="canceled", error_message="canceled by request")
            return JobOutcome(job_id, "canceled" if done.won else "lost", "canceled", released=done.followers_released)

    stage_seconds: dict[str, float] = {}
    state = {"stage": "open", "t_stage": time.monotonic(), "t_write": 0.0, "cancel": False}

    def _flush(stage: str, fraction: float) -> None:
        try:
            with transaction(factory) as s:
                ok = lifecycle.progress(s, lease, stage, fraction, dict(stage_seconds))
                if not ok and not lifecycle.still_owned(s, lease):
                    raise LeaseLost(job_id)
                state["cancel"] = not ok
        except DBAPIError as err:
            if db_full(err):  # SQLite beside the data on a full disk
                raise StorageFullError("no space left for the job store while processing this job") from err
            raise
        state["t_write"] = time.monotonic()

    stages = tracing.StageSpans()  # one span per stage, the first opened with the scratch folder below

    def progress(stage: str, fraction: float) -> None:
        now = time.monotonic()
        if stage != state["stage"]:
            stages.switch(stage)
            stage_seconds[state["stage"]] = round(stage_seconds.get(state["stage"], 0.0) + now - state["t_stage"], 4)
            state["stage"], state["t_stage"] = stage, now
            _flush(stage, fraction)
        elif now - state["t_write"] >= PROGRESS_WRITE_S:
            _flush(stage, fraction)

    def should_cancel(force: bool = False) -> bool:
        if force or time.monotonic() - state["t_write"] >= PROGRESS_WRITE_S:
            with transaction(factory) as s:
                if not lifecycle.still_owned(s, lease):
                    raise LeaseLost(job_id)
                state["cancel"] = lifecycle.cancel_requested(s, job_id)
            state["t_write"] = time.monotonic()
        return bool(state["cancel"])

    def _close_stage() -> None:
        stage_seconds[state["stage"]] = round(
            stage_seconds.get(state["stage"], 0.0) + time.monotonic() - state["t_stage"], 4
        )

    verdict: list[tuple[str, str, str]] = []  # written once the scratch and partial files are gone

    def _verdict(state_: str, code: str, message: str) -> None:
        verdict.append((state_, code, message))

    from service.pipeline import JobCanceled as PipelineCanceled

    outcome = JobOutcome(job_id, "failed", stage_seconds=stage_seconds)

    def _on_infer(model: str, seconds: float) -> None:
        calls = outcome.backend_seconds.setdefault(model, [])
        if len(calls) < MAX_TIMED_CALLS:
            calls.append(round(seconds, 6))

    prefix = lifecycle.result_prefix(tenant_id, job_id, lease.attempt)
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    with scratch_dir(settings.work_dir, scratch_prefix(job_id)) as out_dir, ExitStack() as held:
        held.callback(stages.close)
        stages.switch("open")
        try:
            if pacs_info is not None:  # read over DICOMweb from the configured server, never copied whole
                from service.pacs.jobs import source_for

                slide_path = source_for(pacs_info, tenant_name or "")
            else:
                try:  # an object store copies the slide to this machine's cache, held until the job ends
                    slide_path = held.enter_context(blobs.local_copy(blob_key))
                except FileNotFoundError:
                    raise SlideNotFoundError("the stored slide is missing from the blob store") from None
            rna = None
            if options_rec.get(rna_channel.OPTION):  # this attempt's copy of the profile, in memory only
                rna = rna_channel.read(blobs, job_id, options_rec[rna_channel.OPTION])
            fn = load_callable(pipeline or settings.pipeline)
            kwargs: dict[str, Any] = {"bundle_dir": settings.bundle_dir, "progress": progress}
            if is_default_pipeline(pipeline or settings.pipeline):
                kwargs["backend"] = worker_backend(settings)
                if kwargs["backend"] is not None:  # this job's model calls, for the metrics layer
                    kwargs["backend"].on_infer = _on_infer
                    held.callback(setattr, kwargs["backend"], "on_infer", None)
            options = options_from_record(options_rec, rna)
            rna = None
            result = fn(slide_path, out_dir, options, should_cancel=should_cancel, **kwargs)
            _close_stage()
            if should_cancel(force=True):  # canceled (or its slide deleted) while the last stage ran
                raise PipelineCanceled("canceled by request")
            if pacs_info is not None:  # DICOM results into the slide's study (STOW-RS; deterministic UIDs)
                from service.pacs.jobs import after_pipeline

                progress("store", 0.0)
                after_pipeline(slide_path, out_dir, options_rec, settings.bundle_dir, job_id)
                _close_stage()
            files = {}
            for path in sorted(p for p in out_dir.iterdir() if p.is_file() and not p.name.endswith(".part")):
                key = f"{prefix}/{path.name}"
                files[path.name] = {"key": key, "size": path.stat().st_size, "sha256": _sha256_file(path)}
                blobs.put_file(key, path, move=True)
            if "result.json" not in files:
                raise RuntimeError("the pipeline wrote no result.json")
            with transaction(factory) as s:
                done = lifecycle.succeed(s, lease, files, dict(stage_seconds))
            if not done.won:
                raise LeaseLost(job_id)
            outcome.state, outcome.followers_done = "succeeded", done.followers_done
            if isinstance(result, dict):
                outcome.n_patches = _find_int(result, "n_patches", "num_patches", "patches")
        except LeaseLost:
            log.warning("job %s: attempt %d lost its lease; its own files are removed", job_id, lease.attempt)
            outcome.state = "lost"
        except PipelineCanceled:
            _close_stage()
            _verdict("canceled", "canceled", "canceled by request")
        except MstarError as err:
            _close_stage()
            log.info("job %s failed: %s", job_id, err.code)
            _verdict("failed", err.code, str(err))
        except Exception as err:
            _close_stage()
            if _no_space(err):
                full = StorageFullError("no space left in the slide or result store while processing this job")
                log.error("job %s: %s", job_id, full)
                _verdict("failed", full.code, str(full))
            else:
                # The traceback goes to the worker log under the job id; the user gets no internals.
                log.error("job %s crashed:\n%s", job_id, traceback.format_exc())
                _verdict("failed", "internal_error", f"internal error while processing job {job_id}")
    if outcome.state != "succeeded":
        try:  # only this attempt's files: a winning attempt's result is never touched
            blobs.delete_prefix(prefix)
        except (MstarError, OSError) as err:  # an object store outage: the verdict stands, stray files stay
            log.warning("job %s: could not remove partial results: %s", job_id, err)
    if verdict:  # after the clean-up, so a full disk has room again for the job store's own write
        state_, code, message = verdict[0]
        with transaction(factory) as s:
            done = lifecycle.finish(
                s, lease, state_, error_code=code, error_message=message, stage_seconds=dict(stage_seconds)
            )
        if done.won:
            outcome.state, outcome.error_code, outcome.released = state_, code, done.followers_released
        else:
            outcome.state, outcome.error_code = "lost", None
    if outcome.terminal_ids:  # the jobs this attempt ended no longer need an RNA profile held
        rna_channel.discard(blobs, outcome.terminal_ids)
    return outcome


def is_default_pipeline(spec: str | PipelineFn) -> bool:
    from service.pipeline import run_analysis

    spec = getattr(spec, "mstar_inner", spec)  # a time-limit wrapper names what it wraps
    return spec == "service.pipeline:run_analysis" or spec is run_analysis
