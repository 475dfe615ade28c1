"""Job execution: the worker-side `execute_job`, and the embedded runner that drives it from `mstar serve`.

Two layers, so Celery drops in without touching the gateway:

* `execute_job(job_id, settings)` does one job end to end in the *current* process: load the record, run
  `service.pipeline.run_analysis` on the stored slide, write stage/progress into the job row, honour cancel,
  publish the output files to the blob store and mark the job succeeded/failed/canceled. An embedded worker
  process and a Celery task both call exactly this.
* `JobQueue` is what the gateway needs from a runner (`start`, `stop`, `notify`, `health`).
  `EmbeddedRunner` implements it with a dispatcher thread that claims queued jobs from the store and hands
  them to a bounded pool of *spawned* worker processes, so slide decoding never runs in the API process and a
  crashing decoder takes down a worker, not the gateway. A Celery queue implements `notify` by sending a task.

Durability: the job row is the truth. Jobs left `running` by a stopped server are re-queued on the next start
(up to `job_max_attempts`), jobs still `queued` are simply claimed again.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import multiprocessing
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy.exc import IntegrityError

from service.config import Settings
from service.errors import MstarError, SlideNotFoundError
from service.store import repo
from service.store.blobs import BlobStore, make_blob_store, scratch_dir
from service.store.db import init_db, make_engine, session_factory, transaction
from service.store.models import Job, Slide

log = logging.getLogger("mstar.runner")

PipelineFn = Callable[..., dict]
PROGRESS_WRITE_S = 0.5  # at most this often a progress write / cancel poll hits the database


@dataclass
class JobOutcome:
    """What a finished execution reports back to the dispatcher (metrics, webhooks). Never holds PHI."""

    job_id: str
    state: str
    error_code: str | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    n_patches: int | None = None
    backend_seconds: float | None = None


def options_from_record(options: dict) -> Any:
    """The stored job options as the pipeline's `AnalysisOptions`."""
    from service.pipeline import AnalysisOptions

    extra = {k: v for k, v in (options.get("extra") or {}).items()}
    if options.get("bundle_version"):
        extra["bundle_version"] = options["bundle_version"]
    kwargs: dict[str, Any] = {"extra": extra}
    if options.get("tasks"):
        kwargs["tasks"] = tuple(options["tasks"])
    if options.get("prompts"):
        kwargs["prompts"] = tuple(options["prompts"])
    if options.get("mpp_override") is not None:
        kwargs["mpp_override"] = float(options["mpp_override"])
    return AnalysisOptions(**kwargs)


def load_callable(spec: str | PipelineFn) -> PipelineFn:
    if callable(spec):
        return spec
    module, _, name = spec.partition(":")
    fn = getattr(importlib.import_module(module), name, None)
    if fn is None or not callable(fn):
        raise ImportError(f"pipeline {spec!r} not found")
    return fn


# --- per-process resources (a worker process keeps one engine and store) ---------------------------------

_RESOURCES: dict[str, tuple[Any, Any, BlobStore]] = {}


def _resources(settings: Settings):
    key = f"{settings.db_url}|{settings.blob_url or settings.blob_dir}"
    if key not in _RESOURCES:
        engine = make_engine(settings.db_url)
        init_db(engine)
        _RESOURCES[key] = (engine, session_factory(engine), make_blob_store(settings))
    return _RESOURCES[key]


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


def execute_job(job_id: str, settings: Settings, pipeline: str | PipelineFn | None = None) -> JobOutcome:
    """Run one claimed (state `running`) job to a terminal state. Safe to call in any worker process."""
    from service.pipeline import JobCanceled

    _, factory, blobs = _resources(settings)
    with transaction(factory) as s:
        job = s.get(Job, job_id)
        slide = s.get(Slide, job.slide_id) if job is not None else None
        if job is None or slide is None or job.state != "running":
            return JobOutcome(job_id, job.state if job is not None else "missing")
        tenant_id, options_rec = job.tenant_id, dict(job.options or {})
        if options_rec.get("mpp_override") is None and slide.mpp_override is not None:
            options_rec["mpp_override"] = slide.mpp_override
        blob_key = slide.blob_key
        if job.cancel_requested:
            repo.finish_job(s, job_id, "canceled", error_code="canceled", error_message="canceled by request")
            return JobOutcome(job_id, "canceled")

    stage_seconds: dict[str, float] = {}
    state = {"stage": "open", "t_stage": time.monotonic(), "t_write": 0.0, "cancel": False}

    def _flush(stage: str, fraction: float) -> None:
        with transaction(factory) as s:
            state["cancel"] = not repo.update_progress(s, job_id, stage, fraction, dict(stage_seconds))
        state["t_write"] = time.monotonic()

    def progress(stage: str, fraction: float) -> None:
        now = time.monotonic()
        if stage != state["stage"]:
            stage_seconds[state["stage"]] = round(stage_seconds.get(state["stage"], 0.0) + now - state["t_stage"], 4)
            state["stage"], state["t_stage"] = stage, now
            _flush(stage, fraction)
        elif now - state["t_write"] >= PROGRESS_WRITE_S:
            _flush(stage, fraction)

    def should_cancel(force: bool = False) -> bool:
        if force or time.monotonic() - state["t_write"] >= PROGRESS_WRITE_S:
            with transaction(factory) as s:
                state["cancel"] = repo.cancel_requested(s, job_id)
            state["t_write"] = time.monotonic()
        return bool(state["cancel"])

    def _close_stage() -> None:
        stage_seconds[state["stage"]] = round(
            stage_seconds.get(state["stage"], 0.0) + time.monotonic() - state["t_stage"], 4
        )

    outcome = JobOutcome(job_id, "failed", stage_seconds=stage_seconds)
    with scratch_dir(settings.work_dir, f"job-{job_id}-") as out_dir, ExitStack() as held:
        try:
            try:  # an object store copies the slide to this machine's cache, held until the job ends
                slide_path = held.enter_context(blobs.local_copy(blob_key))
            except FileNotFoundError:
                raise SlideNotFoundError("the stored slide is missing from the blob store") from None
            fn = load_callable(pipeline or settings.pipeline)
            result = fn(
                slide_path,
                out_dir,
                options_from_record(options_rec),
                bundle_dir=settings.bundle_dir,
                progress=progress,
                should_cancel=should_cancel,
            )
            _close_stage()
            if should_cancel(force=True):  # canceled (or its slide deleted) while the last stage ran
                raise JobCanceled("canceled by request")
            files = {}
            for path in sorted(p for p in out_dir.iterdir() if p.is_file() and not p.name.endswith(".part")):
                key = f"results/{tenant_id}/{job_id}/{path.name}"
                files[path.name] = {"key": key, "size": path.stat().st_size, "sha256": _sha256_file(path)}
                blobs.put_file(key, path, move=True)
            if "result.json" not in files:
                raise RuntimeError("the pipeline wrote no result.json")
            with transaction(factory) as s:
                job = s.get(Job, job_id)
                if job is None or job.state != "running":  # deleted with its slide meanwhile
                    raise JobCanceled("the job was removed")
                try:
                    repo.save_result(s, job, files)
                except IntegrityError:  # the slide and its jobs were deleted a moment ago
                    raise JobCanceled("the job was removed") from None
                repo.finish_job(s, job_id, "succeeded", stage_seconds=dict(stage_seconds))
            outcome.state = "succeeded"
            if isinstance(result, dict):
                outcome.n_patches = _find_int(result, "n_patches", "num_patches", "patches")
        except JobCanceled:
            _close_stage()
            with transaction(factory) as s:
                repo.finish_job(
                    s,
                    job_id,
                    "canceled",
                    error_code="canceled",
                    error_message="canceled by request",
                    stage_seconds=dict(stage_seconds),
                )
            outcome.state, outcome.error_code = "canceled", "canceled"
        except MstarError as err:
            _close_stage()
            log.info("job %s failed: %s", job_id, err.code)
            with transaction(factory) as s:
                repo.finish_job(
                    s,
                    job_id,
                    "failed",
                    error_code=err.code,
                    error_message=str(err),
                    stage_seconds=dict(stage_seconds),
                )
            outcome.error_code = err.code
        except Exception:
            _close_stage()
            # The traceback goes to the worker log under the job id; the user gets no internals.
            log.error("job %s crashed:\n%s", job_id, traceback.format_exc())
            with transaction(factory) as s:
                repo.finish_job(
                    s,
                    job_id,
                    "failed",
                    error_code="internal_error",
                    error_message=f"internal error while processing job {job_id}",
                    stage_seconds=dict(stage_seconds),
                )
            outcome.error_code = "internal_error"
    if outcome.state != "succeeded":
        try:
            blobs.delete_prefix(f"results/{tenant_id}/{job_id}")
        except MstarError as err:  # an object store outage: the job's verdict stands, stray files stay
            log.warning("job %s: could not remove partial results: %s", job_id, err)
    return outcome


def _worker_init() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s[%(process)d] %(message)s")


# --- the gateway side ---------------------------------------------------------------------------------------


class JobQueue(Protocol):
    """What the gateway needs from a job runner. Embedded processes today; Celery replaces it later."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def notify(self, job_id: str) -> None:
        """A job was queued (embedded: wake the dispatcher; Celery: send the task)."""

    def health(self) -> dict:
        """`{"ok": bool, ...}`, checked for real by /readyz."""


class EmbeddedRunner:
    """Bounded pool of spawned worker processes fed by a dispatcher thread that claims jobs from the store."""

    def __init__(
        self,
        settings: Settings,
        *,
        pipeline: str | PipelineFn | None = None,
        on_outcome: Callable[[JobOutcome], None] | None = None,
    ) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.on_outcome = on_outcome
        engine = make_engine(settings.db_url)
        init_db(engine)
        self._factory = session_factory(engine)
        self._engine = engine
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._inflight: dict[Future, str] = {}
        self._pool: ProcessPoolExecutor | None = None
        self._thread: threading.Thread | None = None
        self._hooks = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mstar-webhook")
        self._last_tick = 0.0
        self.worker_name = f"{socket.gethostname()}:{os.getpid()}"

    # lifecycle
    def start(self) -> None:
        with transaction(self._factory) as s:
            recovered = repo.recover_orphans(s, max_attempts=self.settings.job_max_attempts)
        if any(recovered.values()):
            log.info("recovered jobs from a previous run: %s", recovered)
        self._pool = self._new_pool()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="mstar-dispatcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop claiming; kill workers mid-job (their jobs stay `running` and are recovered at next start)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        pool, self._pool = self._pool, None
        if pool is not None:
            self._kill_pool(pool)
        self._hooks.shutdown(wait=False, cancel_futures=True)
        self._engine.dispose()

    def notify(self, job_id: str) -> None:
        self._wake.set()

    def health(self) -> dict:
        alive = self._thread is not None and self._thread.is_alive()
        fresh = time.monotonic() - self._last_tick < max(10.0, 20 * self.settings.runner_poll_s)
        with self._lock:
            busy = len(self._inflight)
        return {
            "ok": bool(alive and fresh and self._pool is not None),
            "kind": "embedded",
            "workers": self.settings.runner_workers,
            "busy": busy,
        }

    # internals
    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.settings.runner_workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_init,
        )

    @staticmethod
    def _kill_pool(pool: ProcessPoolExecutor) -> None:
        procs = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._last_tick = time.monotonic()
            try:
                self._fill()
            except Exception:  # the store may be briefly unavailable; keep the dispatcher alive
                log.exception("dispatcher iteration failed")
            self._wake.wait(self.settings.runner_poll_s)
            self._wake.clear()

    def _fill(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                if len(self._inflight) >= self.settings.runner_workers or self._pool is None:
                    return
            with transaction(self._factory) as s:
                job_id = repo.claim_next(s, self.worker_name)
            if job_id is None:
                return
            log.info("job %s claimed", job_id)
            try:
                fut = self._pool.submit(execute_job, job_id, self.settings, self.pipeline)
            except (BrokenProcessPool, RuntimeError):
                self._handle_crash(job_id)
                continue
            with self._lock:
                self._inflight[fut] = job_id
            fut.add_done_callback(self._done)

    def _done(self, fut: Future) -> None:
        with self._lock:
            job_id = self._inflight.pop(fut, None)
        if job_id is None or self._stop.is_set():
            return
        exc = fut.exception()
        if exc is None:
            self._after(fut.result())
        else:
            log.error("worker for job %s died: %r", job_id, exc)
            self._handle_crash(job_id)
        self._wake.set()

    def _handle_crash(self, job_id: str) -> None:
        """A worker process died (segfault in a decoder, OOM kill): retry or fail the job, renew the pool."""
        if isinstance(self._pool, ProcessPoolExecutor) and getattr(self._pool, "_broken", False):
            old, self._pool = self._pool, self._new_pool()
            threading.Thread(target=self._kill_pool, args=(old,), daemon=True).start()
        with transaction(self._factory) as s:
            job = s.get(Job, job_id)
            if job is None or job.state != "running":
                return
            if job.attempts >= self.settings.job_max_attempts:
                repo.finish_job(
                    s,
                    job_id,
                    "failed",
                    error_code="worker_crashed",
                    error_message="the worker process died while processing this slide",
                )
                outcome = JobOutcome(job_id, "failed", error_code="worker_crashed")
            else:
                repo.requeue(s, job_id)
                return
        self._after(outcome)

    def _after(self, outcome: JobOutcome) -> None:
        if self.on_outcome is not None:
            try:
                self.on_outcome(outcome)
            except Exception:
                log.exception("outcome observer failed")
        self.job_terminal(outcome.job_id)

    def job_terminal(self, job_id: str) -> None:
        """Deliver the job's webhook, if it has one, off the dispatcher thread."""
        from service import webhooks

        with transaction(self._factory) as s:
            job = s.get(Job, job_id)
            if job is None or not job.webhook_url:
                return
            payload = webhooks.job_payload(job)
            url = job.webhook_url
        if not self._stop.is_set():
            self._hooks.submit(webhooks.deliver, url, payload, self.settings)

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Until no job is queued or running (tests and benchmarks)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with transaction(self._factory) as s:
                counts = repo.count_by_state(s)
            if counts["queued"] == 0 and counts["running"] == 0:
                return True
            time.sleep(0.1)
        return False


def make_queue(settings: Settings, **kwargs: Any) -> JobQueue:
    """The runner for these settings: embedded unless a broker is configured."""
    if settings.broker_url:
        try:
            from service.worker.queue import CeleryQueue  # type: ignore[import-not-found]
        except ImportError as err:
            raise RuntimeError("MSTAR_BROKER_URL is set but the Celery queue is not available") from err
        return CeleryQueue(settings)
    return EmbeddedRunner(settings, **kwargs)
