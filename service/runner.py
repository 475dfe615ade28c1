"""Job execution: the worker-side `execute_job`, and the embedded runner that drives it from `mstar serve`.

Two layers, so Celery drops in without touching the gateway:

* `execute_job(job_id, settings)` does one job end to end in the *current* process: load the record, run
  `service.pipeline.run_analysis` on the stored slide, write stage/progress into the job row, honour cancel,
  publish the output files to the blob store and mark the job succeeded/failed/canceled. An embedded worker
  process and a Celery task both call exactly this.
* `JobQueue` is what the gateway needs from a runner (`start`, `stop`, `notify`, `health`).
  `EmbeddedRunner` implements it with a dispatcher thread that claims queued jobs from the store and hands
  them to a bounded set of *spawned* worker processes, one job per worker at a time, so slide decoding never
  runs in the API process and a crashing decoder takes down a worker, not the gateway. A Celery queue
  implements `notify` by sending a task.

Time limits are the Celery ones (`MSTAR_TASK_SOFT_TIME_LIMIT_S` / `MSTAR_TASK_TIME_LIMIT_S`): the soft limit
raises `JobTimeLimitError` inside the pipeline (SIGALRM in the worker), the hard limit kills the worker from
the dispatcher and fails the job with `time_limit`; a fresh worker takes its place.

Durability: the job row is the truth. Jobs left `running` by a stopped server are re-queued on the next start
(up to `job_max_attempts`), jobs still `queued` are simply claimed again. Webhooks go through the claim in
`service.webhooks.send_for_job`, so each terminal job's webhook has one sender at a time.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from multiprocessing import util as mp_util
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as mp_wait
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from service.config import Settings, time_limits
from service.errors import JobTimeLimitError, MstarError, SlideNotFoundError
from service.store import repo
from service.store.blobs import BlobStore, make_blob_store, scratch_dir
from service.store.db import init_db, make_engine, session_factory, transaction
from service.store.models import Job, Slide, utcnow

log = logging.getLogger("mstar.runner")

PipelineFn = Callable[..., dict]
PROGRESS_WRITE_S = 0.5  # at most this often a progress write / cancel poll hits the database
CANCEL_GRACE_S = 20.0  # a running job still going this long after its cancel has its worker killed
UNREPORTED_WINDOW_S = 3600.0  # terminal jobs older than this without a webhook sender are not reported any more


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


def job_tenant_name(s: Any, tenant_id: str) -> str:
    from service.store.models import Tenant

    tenant = s.get(Tenant, tenant_id)
    return tenant.name if tenant is not None else ""


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
        pacs_info = dict(slide.info or {}) if slide.format == "pacs" else None  # a slide that lives in a PACS
        tenant_name = job_tenant_name(s, tenant_id) if pacs_info is not None else None
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
            if pacs_info is not None:
                from service.pacs.jobs import source_for

                slide_path = source_for(pacs_info, tenant_name or "")
            else:
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
            if pacs_info is not None:  # DICOM results into the slide's study (STOW-RS), before publishing
                from service.pacs.jobs import after_pipeline

                progress("store", 0.0)
                after_pipeline(slide_path, out_dir, options_rec, settings.bundle_dir, job_id)
                _close_stage()
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


def _soft_limited(spec: str | PipelineFn, soft_s: float, deadline: float) -> PipelineFn:
    """The pipeline under the soft time limit: SIGALRM raises `JobTimeLimitError` inside it, so `execute_job`
    records `time_limit` and cleans up like any other failure. Code stuck in C never sees the signal; the
    dispatcher's hard limit (a kill) covers that."""

    def run(*args: Any, **kwargs: Any) -> dict:
        from service.pipeline import JobCanceled

        fn = load_callable(spec)  # inside execute_job's error handling: a bad name fails the job
        message = f"the job exceeded its soft time limit of {soft_s:g} s and was stopped"
        fired = False

        def alarm(_signum: int, _frame: Any) -> None:
            nonlocal fired
            fired = True
            raise JobTimeLimitError(message)

        previous = signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, max(0.001, deadline - time.monotonic()))
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            # A reader that wraps every error (`except Exception: raise CorruptSlideError`) must not turn the
            # time limit into a misleading verdict.
            if fired and not isinstance(err, JobTimeLimitError | JobCanceled):
                raise JobTimeLimitError(message) from err
            raise
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    return run


def _worker_main(conn: Connection, settings: Settings, warm: str | PipelineFn | None) -> None:
    """One long-lived worker process: runs the jobs the dispatcher sends, one at a time, until its pipe closes.

    It imports the pipeline before saying `ready`, so start-up time never counts against a job's time limit."""
    _worker_init()
    try:
        import service.pipeline  # noqa: F401

        load_callable(warm or settings.pipeline)
    except Exception:  # the job will fail with the reason; the worker itself is fine
        log.warning("could not preload the pipeline", exc_info=True)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the gateway went away
            return
        if msg is None:
            return
        job_id, pipeline, soft_s = msg
        deadline = time.monotonic() + soft_s
        try:
            outcome = execute_job(job_id, settings, _soft_limited(pipeline or settings.pipeline, soft_s, deadline))
        except Exception as err:  # e.g. the job store unreachable before the job could be recorded
            log.error("job %s could not run:\n%s", job_id, traceback.format_exc())
            conn.send(("error", type(err).__name__))
            continue
        conn.send(("done", outcome))


# --- the gateway side ---------------------------------------------------------------------------------------


class JobQueue(Protocol):
    """What the gateway needs from a job runner. Embedded processes today; Celery replaces it later."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def notify(self, job_id: str) -> None:
        """A job was queued (embedded: wake the dispatcher; Celery: send the task)."""

    def health(self) -> dict:
        """`{"ok": bool, ...}`, checked for real by /readyz."""


@dataclass
class _Slot:
    """One worker process and the job it runs (None when idle)."""

    proc: Any  # multiprocessing.context.SpawnProcess
    conn: Connection
    ready: bool = False
    job_id: str | None = None
    started: float = 0.0  # monotonic time the job was handed over
    cancel_seen: float | None = None  # when the dispatcher first saw the job's cancel request


def _stop_process(proc: Any, conn: Connection | None = None) -> None:
    if proc.is_alive():
        proc.kill()
    proc.join(5)
    if conn is not None:
        conn.close()


def _stop_all(slots: list[_Slot], stop: threading.Event | None = None) -> None:
    if stop is not None:  # the dispatcher must not start replacements meanwhile
        stop.set()
    for slot in list(slots):
        _stop_process(slot.proc, slot.conn)
    slots.clear()


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


class EmbeddedRunner:
    """Spawned worker processes fed by a dispatcher thread that claims jobs from the store.

    Each worker runs one job at a time and is addressed on its own pipe, so the dispatcher can enforce the hard
    time limit (and a cancel the job ignores) by killing exactly that worker and starting a fresh one; the other
    workers carry on. Every terminal job's webhook goes through `service.webhooks.send_for_job`, whose claim
    lets it leave once whoever ended the job (worker, dispatcher, API cancel, start-up recovery).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        pipeline: str | PipelineFn | None = None,
        on_outcome: Callable[[JobOutcome], None] | None = None,
        cancel_grace_s: float = CANCEL_GRACE_S,
    ) -> None:
        self.soft_s, self.hard_s = time_limits(settings)
        self.settings = settings
        self.pipeline = pipeline
        self.on_outcome = on_outcome
        self.cancel_grace_s = cancel_grace_s
        engine = make_engine(settings.db_url)
        init_db(engine)
        self._factory = session_factory(engine)
        self._engine = engine
        self._mp = multiprocessing.get_context("spawn")
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._slots: list[_Slot] = []
        # never leave workers behind: runs when the runner is collected, or at exit before multiprocessing
        # joins its (non-daemon) children
        self._finalizer = mp_util.Finalize(self, _stop_all, args=(self._slots, self._stop), exitpriority=10)
        self._respawn_at = 0.0
        self._worker_error: str | None = None  # why workers cannot start (cleared once one is ready)
        self._swept_at = 0.0
        self._blobs: BlobStore | None = None
        self._wake_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._wake_open = True
        self._thread: threading.Thread | None = None
        self._hooks = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mstar-webhook")
        self._last_tick = 0.0
        self.worker_name = f"{socket.gethostname()}:{os.getpid()}"

    # lifecycle
    def start(self) -> None:
        """Recover what a previous run left, send the webhooks nobody sent (jobs it just failed or canceled
        included), then start the dispatcher and the workers."""
        with transaction(self._factory) as s:
            recovered = repo.recover_orphans(s, max_attempts=self.settings.job_max_attempts)
        if any(recovered.values()):
            log.info("recovered jobs from a previous run: %s", recovered)
        self._sweep_webhooks(settled_s=0.0)
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="mstar-dispatcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop claiming; kill workers mid-job (their jobs stay `running` and are recovered at next start)."""
        self._stop.set()
        self._wakeup()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            _stop_all(self._slots)
        self._hooks.shutdown(wait=False, cancel_futures=True)  # unsent ones are swept at the next start
        with self._wake_lock:
            if self._wake_open:
                self._wake_open = False
                os.close(self._wake_r)
                os.close(self._wake_w)
        self._engine.dispose()

    def notify(self, job_id: str) -> None:
        self._wakeup()

    def health(self) -> dict:
        alive = self._thread is not None and self._thread.is_alive()
        fresh = time.monotonic() - self._last_tick < max(10.0, 20 * self.settings.runner_poll_s)
        with self._lock:
            slots = list(self._slots)
        out = {
            "ok": bool(alive and fresh and self._worker_error is None),
            "kind": "embedded",
            "workers": self.settings.runner_workers,
            "ready": sum(1 for s in slots if s.ready),
            "busy": sum(1 for s in slots if s.job_id is not None),
            "time_limit_s": self.hard_s,
        }
        if self._worker_error is not None:
            out["detail"] = self._worker_error
        return out

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

    # webhooks
    def job_terminal(self, job_id: str) -> None:
        """Send the job's webhook off the caller's thread, if it has one and nobody has claimed it yet (the
        claim happens on the sending thread, so a send dropped at shutdown is still unclaimed and swept)."""
        if self._stop.is_set():
            return
        with suppress(RuntimeError):  # the pool is shutting down
            self._hooks.submit(self._send_webhook, job_id)

    def _send_webhook(self, job_id: str) -> None:
        from service import webhooks

        try:
            webhooks.send_for_job(self._factory, job_id, self.settings)
        except Exception:  # the verdict is recorded either way; the receiver can poll GET /jobs/{id}
            log.exception("webhook for job %s failed", job_id)

    def _sweep_webhooks(self, *, settled_s: float) -> None:
        """Terminal jobs whose webhook nobody claimed (the gateway stopped before sending, or start-up
        recovery just ended them) or whose sender died mid-delivery: send them now."""
        from service import webhooks
        from service.worker.jobs import unreported

        lease = self.settings.worker_lease_s
        with transaction(self._factory) as s:
            due = unreported(
                s,
                settled_s=settled_s,
                window_s=max(UNREPORTED_WINDOW_S, 10 * lease),
                reclaim_after_s=webhooks.claim_lease_s(self.settings),
            )
        for job_id in due:
            self.job_terminal(job_id)
        self._swept_at = time.monotonic()

    def _after(self, outcome: JobOutcome) -> None:
        if self.on_outcome is not None:
            try:
                self.on_outcome(outcome)
            except Exception:
                log.exception("outcome observer failed")
        self.job_terminal(outcome.job_id)

    # the dispatcher
    def _wakeup(self) -> None:
        with self._wake_lock:
            if self._wake_open:
                with suppress(BlockingIOError):  # plenty of wake-ups already pending
                    os.write(self._wake_w, b"x")

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._last_tick = time.monotonic()
            try:
                self._tick()
            except Exception:  # the store may be briefly unavailable; keep the dispatcher alive
                log.exception("dispatcher iteration failed")
            self._sleep()

    def _tick(self) -> None:
        self._collect()
        self._enforce_limits()
        self._replace_workers()
        self._fill()
        if time.monotonic() - self._swept_at >= self.settings.worker_lease_s:
            self._sweep_webhooks(settled_s=self.settings.worker_lease_s)

    def _sleep(self) -> None:
        """Until a worker reports or dies, a job is queued, a deadline passes or the poll period ends."""
        now = time.monotonic()
        timeout = self.settings.runner_poll_s
        with self._lock:
            slots = list(self._slots)
        for slot in slots:
            if slot.job_id is not None:
                timeout = min(timeout, slot.started + self.hard_s - now)
        if len(slots) < self.settings.runner_workers:
            timeout = min(timeout, self._respawn_at - now)
        waitables: list[Any] = [self._wake_r]
        for slot in slots:
            waitables += [slot.conn, slot.proc.sentinel]
        try:
            mp_wait(waitables, timeout=max(0.01, timeout))
        except (OSError, ValueError):  # a pipe closed under us: the next tick sees why
            time.sleep(0.01)
        with self._wake_lock, suppress(OSError):  # BlockingIOError once drained
            while self._wake_open and os.read(self._wake_r, 4096):
                pass

    def _collect(self) -> None:
        """Read what the workers reported; handle those that died."""
        with self._lock:
            slots = list(self._slots)
        for slot in slots:
            alive = self._drain(slot)
            if not alive or not slot.proc.is_alive():
                self._drain(slot)  # it may have reported just before it died
                self._lost(slot)

    def _drain(self, slot: _Slot) -> bool:
        try:
            while slot.conn.poll():
                kind, value = slot.conn.recv()
                if kind == "ready":
                    slot.ready, self._worker_error = True, None
                    continue
                job_id, slot.job_id, slot.cancel_seen = slot.job_id, None, None
                if kind == "done":
                    self._after(value)
                elif job_id is not None:
                    log.error("job %s: the worker could not run it (%s)", job_id, value)
                    self._handle_crash(job_id, f"the worker could not run this job ({value})")
        except (EOFError, OSError):
            return False
        return True

    def _lost(self, slot: _Slot) -> None:
        with self._lock:
            if slot in self._slots:
                self._slots.remove(slot)
        _stop_process(slot.proc, slot.conn)
        why = _death(slot.proc.exitcode)
        if not slot.ready:  # died while starting: do not respawn in a tight loop
            log.error("a worker process died while starting (%s)", why)
            self._respawn_at = time.monotonic() + 1.0
            self._worker_error = f"worker processes die while starting ({why})"
        if slot.job_id is not None:
            log.error("worker for job %s died (%s)", slot.job_id, why)
            self._handle_crash(slot.job_id, f"the worker process died while processing this slide ({why})")

    def _enforce_limits(self) -> None:
        """Kill the worker of a job past its hard time limit, or one that ignores its cancel for too long."""
        now = time.monotonic()
        with self._lock:
            busy = [s for s in self._slots if s.job_id is not None]
        if not busy:
            return
        with transaction(self._factory) as s:
            q = select(Job.id, Job.cancel_requested).where(Job.id.in_([b.job_id for b in busy]))
            rows = {job_id: bool(flag) for job_id, flag in s.execute(q)}
        for slot in busy:
            job_id = slot.job_id
            if job_id is None:
                continue
            if now - slot.started >= self.hard_s:
                log.warning("job %s passed its hard time limit of %g s: stopping its worker", job_id, self.hard_s)
                self._kill(slot)
                self._decide(
                    job_id,
                    "failed",
                    "time_limit",
                    f"the job exceeded its hard time limit of {self.hard_s:g} s and its worker was stopped",
                )
            elif rows.get(job_id, True):  # cancel asked for, or the job was deleted with its slide
                if slot.cancel_seen is None:
                    slot.cancel_seen = now
                elif now - slot.cancel_seen >= self.cancel_grace_s:
                    log.warning("job %s ignored its cancel for %g s: stopping its worker", job_id, self.cancel_grace_s)
                    self._kill(slot)
                    self._decide(job_id, "canceled", "canceled", "canceled by request")

    def _kill(self, slot: _Slot) -> None:
        with self._lock:
            if slot in self._slots:
                self._slots.remove(slot)
        _stop_process(slot.proc, slot.conn)

    def _decide(self, job_id: str, state: str, code: str, message: str) -> None:
        """Record the verdict on a job whose worker was killed (only if it is still running: it may have just
        finished), clean up after the dead worker, and report it."""
        with transaction(self._factory) as s:
            won = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == "running")
                .values(state=state, finished_at=utcnow(), error_code=code, error_message=message)
                .execution_options(synchronize_session=False)
            ).rowcount
            job = s.get(Job, job_id)
            tenant_id, final = (job.tenant_id, job.state) if job is not None else (None, None)
        self._clean_after(job_id, tenant_id, results=final != "succeeded")
        if won == 1:
            self._after(JobOutcome(job_id, state, error_code=code))
        elif final is not None:
            self.job_terminal(job_id)  # it ended on its own just before the kill

    def _handle_crash(self, job_id: str, message: str) -> None:
        """A worker process died (segfault in a decoder, OOM kill), or could not run the job: retry or fail it."""
        outcome = None
        with transaction(self._factory) as s:
            job = s.get(Job, job_id)
            if job is None:
                return
            tenant_id, state = job.tenant_id, job.state
            if state == "running":
                if job.attempts >= self.settings.job_max_attempts:
                    repo.finish_job(
                        s,
                        job_id,
                        "failed",
                        error_code="worker_crashed",
                        error_message=message,
                    )
                    outcome = JobOutcome(job_id, "failed", error_code="worker_crashed")
                else:
                    repo.requeue(s, job_id)
        self._clean_after(job_id, tenant_id, results=state != "succeeded")
        if outcome is not None:
            self._after(outcome)
        elif state != "running":
            self.job_terminal(job_id)  # it ended before the worker died, unreported

    def _clean_after(self, job_id: str, tenant_id: str | None, *, results: bool) -> None:
        """What a killed worker left: its scratch directory and, unless the job succeeded, partial results."""
        for stale in self.settings.work_dir.glob(f"job-{job_id}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if results and tenant_id is not None:
            try:
                if self._blobs is None:
                    self._blobs = make_blob_store(self.settings)
                self._blobs.delete_prefix(f"results/{tenant_id}/{job_id}")
            except MstarError as err:
                log.warning("job %s: could not remove partial results: %s", job_id, err)

    def _replace_workers(self) -> None:
        while not self._stop.is_set() and time.monotonic() >= self._respawn_at:
            with self._lock:
                if len(self._slots) >= self.settings.runner_workers:
                    return
            parent, child = self._mp.Pipe()
            proc = self._mp.Process(
                target=_worker_main, args=(child, self.settings, self.pipeline), name="mstar-worker", daemon=False
            )
            try:
                proc.start()
            except Exception:  # out of processes or memory: try again a little later, not in a tight loop
                log.exception("could not start a worker process")
                parent.close()
                self._respawn_at = time.monotonic() + 5.0
                self._worker_error = "worker processes cannot be started"
                return
            finally:
                child.close()
            with self._lock:
                self._slots.append(_Slot(proc, parent))

    def _fill(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                idle = next((s for s in self._slots if s.ready and s.job_id is None), None)
            if idle is None:
                return
            with transaction(self._factory) as s:
                job_id = repo.claim_next(s, self.worker_name)
            if job_id is None:
                return
            log.info("job %s claimed", job_id)
            idle.job_id, idle.started, idle.cancel_seen = job_id, time.monotonic(), None
            try:
                idle.conn.send((job_id, self.pipeline, self.soft_s))
            except (OSError, ValueError):  # the worker died just now: its job is retried or failed
                self._lost(idle)


def make_queue(settings: Settings, **kwargs: Any) -> JobQueue:
    """The runner for these settings: embedded unless a broker is configured."""
    if settings.broker_url:
        try:
            from service.worker.queue import CeleryQueue  # type: ignore[import-not-found]
        except ImportError as err:
            raise RuntimeError("MSTAR_BROKER_URL is set but the Celery queue is not available") from err
        return CeleryQueue(settings)
    return EmbeddedRunner(settings, **kwargs)
