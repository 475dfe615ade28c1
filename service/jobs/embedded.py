"""The embedded job runner of `mstar serve`: a dispatcher thread in the gateway claims jobs fairly from the store
(`lifecycle.claim_fair`) and hands each to one of a bounded set of *spawned*, long-lived worker processes, one job
per worker at a time, so slide decoding never runs in the API process and a crashing decoder takes down a
worker, not the gateway.

Workers die with their gateway: each sets a parent-death signal (`PR_SET_PDEATHSIG`, SIGKILL) and exits if its
parent is already gone, so a gateway killed by the OOM killer leaves no orphan that could race the attempt the next
gateway starts. Even if one survived, its writes are fenced by its lease (`service.jobs.lifecycle`), and it would
remove only its own attempt's files.

Time limits are the Celery ones (`MSTAR_TASK_SOFT_TIME_LIMIT_S` / `MSTAR_TASK_TIME_LIMIT_S`): the soft limit
raises `JobTimeLimitError` inside the pipeline (SIGALRM in the worker), the hard limit kills the worker from
the dispatcher and fails the job with `time_limit`; a fresh worker takes its place.

Durability: the job row is the truth. Jobs left `running` by a stopped gateway are re-queued on the next start
(up to `job_max_attempts`), jobs still `queued` are simply claimed again. Webhooks go through the claim in
`service.webhooks.send_for_job`, so each terminal job's webhook has one sender at a time.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from multiprocessing import util as mp_util
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as mp_wait
from typing import Any

from sqlalchemy import select

from service import webhooks
from service.config import Settings, time_limits
from service.errors import JobTimeLimitError, MstarError
from service.jobs import lifecycle, rna_channel
from service.jobs.execute import (
    JobOutcome,
    PipelineFn,
    execute_job,
    is_default_pipeline,
    load_callable,
    sweep_scratch,
    worker_backend,
)
from service.jobs.lifecycle import Lease
from service.jobs.resources import open_store
from service.obs import tracing
from service.store.db import transaction
from service.store.models import Job

log = logging.getLogger("mstar.runner")

CANCEL_GRACE_S = 20.0  # a running job still going this long after its cancel has its worker killed
UNREPORTED_WINDOW_S = 3600.0  # terminal jobs older than this without a webhook sender are not reported any more
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux), and exit now if it already has."""
    with suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)


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

    run.mstar_inner = spec  # type: ignore[attr-defined]  (so the worker still reuses its model backend)
    return run


def _worker_main(conn: Connection, settings: Settings, warm: str | PipelineFn | None, parent_pid: int) -> None:
    """One long-lived worker process: runs the jobs the dispatcher sends, one at a time, until its pipe closes.

    It imports the pipeline before saying `ready`, so start-up time never counts against a job's time limit."""
    die_with_parent(parent_pid)
    _worker_init()
    # Spawned, so nothing of the gateway's tracer provider is inherited: OTEL_* configures this process's own,
    # and each job span continues the trace stored with its job (`Lease.trace_parent`).
    tracing.setup("mstar-worker")
    try:
        import service.pipeline  # noqa: F401

        spec = warm or settings.pipeline
        load_callable(spec)
        if is_default_pipeline(spec):
            worker_backend(settings)  # the model is loaded once, before the first job's clock starts
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
        lease, pipeline, soft_s = msg
        job_id = lease.job_id
        deadline = time.monotonic() + soft_s
        try:
            outcome = execute_job(lease, settings, _soft_limited(pipeline or settings.pipeline, soft_s, deadline))
        except Exception as err:  # e.g. the job store unreachable before the job could be recorded
            log.error("job %s could not run:\n%s", job_id, traceback.format_exc())
            conn.send(("error", type(err).__name__))
            continue
        conn.send(("done", outcome))


# --- the gateway side ---------------------------------------------------------------------------------------


@dataclass
class _Slot:
    """One worker process and the job it runs (None when idle)."""

    proc: Any  # multiprocessing.context.SpawnProcess
    conn: Connection
    ready: bool = False
    lease: Lease | None = None
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
    """Spawned worker processes fed by a dispatcher thread that claims jobs fairly from the store.

    Each worker runs one job at a time and is addressed on its own pipe, so the dispatcher can enforce the hard
    time limit (and a cancel the job ignores) by killing exactly that worker and starting a fresh one; the other
    workers carry on. Every verdict the dispatcher writes is fenced by the lease it handed out.
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
        self._store = open_store(settings)
        self._factory = self._store.sessions
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
        self._wake_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._wake_open = True
        self._thread: threading.Thread | None = None
        self._hooks = webhooks.Deliveries(self._factory, settings)  # fair between tenants, off the job slots
        self._last_tick = 0.0
        self.worker_name = f"{socket.gethostname()}:{os.getpid()}"

    # lifecycle
    def start(self) -> None:
        """Recover what a previous run left (its workers died with it), remove its scratch folders, send the
        webhooks nobody sent (jobs it just failed or canceled included), then start dispatching."""
        with transaction(self._factory) as s:
            recovered = lifecycle.recover_orphans(s, max_attempts=self.settings.job_max_attempts)
        if any(recovered.values()):
            log.info("recovered jobs from a previous run: %s", recovered)
        swept = sweep_scratch(self.settings.work_dir)
        if swept:
            log.info("removed %d scratch folder(s) left by killed runs", swept)
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
        self._hooks.close()  # unsent ones are swept at the next start
        with self._wake_lock:
            if self._wake_open:
                self._wake_open = False
                os.close(self._wake_r)
                os.close(self._wake_w)

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
            "busy": sum(1 for s in slots if s.lease is not None),
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
                counts = lifecycle.count_by_state(s)
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
        self._hooks.submit(job_id)

    def _sweep_webhooks(self, *, settled_s: float) -> None:
        """Terminal jobs whose webhook nobody claimed (the gateway stopped before sending, or start-up
        recovery just ended them) or whose sender died mid-delivery: send them now."""
        lease = self.settings.worker_lease_s
        with transaction(self._factory) as s:
            due = lifecycle.unreported(
                s,
                settled_s=settled_s,
                window_s=max(UNREPORTED_WINDOW_S, 10 * lease),
                reclaim_after_s=webhooks.claim_lease_s(self.settings),
            )
        for job_id in due:
            self.job_terminal(job_id)
        self._swept_at = time.monotonic()
        try:  # RNA profiles of jobs that ended outside an attempt (canceled while queued, recovered, slide deleted)
            rna_channel.sweep(self._factory, self._store.blobs, ttl_s=self.settings.rna_ttl_s)
        except Exception as err:  # the store briefly unreachable: the next sweep removes them
            log.warning("RNA profile sweep failed: %s", type(err).__name__)

    def _after(self, outcome: JobOutcome) -> None:
        if outcome.state == "lost":
            return
        if self.on_outcome is not None:
            try:
                self.on_outcome(outcome)
            except Exception:
                log.exception("outcome observer failed")
        for job_id in outcome.terminal_ids:
            self.job_terminal(job_id)
        if outcome.released:
            self._wakeup()

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
            self._reap_own()
            self._sweep_webhooks(settled_s=self.settings.worker_lease_s)

    def _reap_own(self) -> None:
        """Jobs this runner claimed that none of its workers holds: their ending never reached the job store (a full
        disk, the database down for a moment), so they stayed `running` for ever, and a cancel could not end them.
        They run again, or fail once out of attempts, as after a worker crash. Runs on the dispatcher thread, which
        alone claims and hands out jobs, so a job between its claim and its worker is never taken for one of these."""
        with self._lock:
            held = {slot.lease.job_id for slot in self._slots if slot.lease is not None}
        with transaction(self._factory) as s:
            rows = s.execute(
                select(Job.id, Job.attempts).where(Job.state == "running", Job.worker == self.worker_name)
            ).all()
        for job_id, attempts in rows:
            if job_id not in held:
                log.warning("job %s: its ending was never recorded; running it again or failing it", job_id)
                self._handle_crash(
                    Lease(job_id, self.worker_name, attempts or 0),
                    "the job's ending could not be recorded (the job store was full or unreachable)",
                )

    def _sleep(self) -> None:
        """Until a worker reports or dies, a job is queued, a deadline passes or the poll period ends."""
        now = time.monotonic()
        timeout = self.settings.runner_poll_s
        with self._lock:
            slots = list(self._slots)
        for slot in slots:
            if slot.lease is not None:
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
                lease, slot.lease, slot.cancel_seen = slot.lease, None, None
                if kind == "done":
                    self._after(value)
                elif lease is not None:
                    log.error("job %s: the worker could not run it (%s)", lease.job_id, value)
                    self._handle_crash(lease, f"the worker could not run this job ({value})")
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
        if slot.lease is not None:
            log.error("worker for job %s died (%s)", slot.lease.job_id, why)
            self._handle_crash(slot.lease, f"the worker process died while processing this slide ({why})")

    def _enforce_limits(self) -> None:
        """Kill the worker of a job past its hard time limit, or one that ignores its cancel for too long."""
        now = time.monotonic()
        with self._lock:
            busy = [s for s in self._slots if s.lease is not None]
        if not busy:
            return
        with transaction(self._factory) as s:
            q = select(Job.id, Job.cancel_requested).where(Job.id.in_([b.lease.job_id for b in busy]))
            rows = {job_id: bool(flag) for job_id, flag in s.execute(q)}
        for slot in busy:
            lease = slot.lease
            if lease is None:
                continue
            if now - slot.started >= self.hard_s:
                log.warning("job %s passed its hard time limit of %g s: stopping its worker", lease.job_id, self.hard_s)
                self._kill(slot)
                self._decide(
                    lease,
                    "failed",
                    "time_limit",
                    f"the job exceeded its hard time limit of {self.hard_s:g} s and its worker was stopped",
                )
            elif rows.get(lease.job_id, True):  # cancel asked for, or the job was deleted with its slide
                if slot.cancel_seen is None:
                    slot.cancel_seen = now
                elif now - slot.cancel_seen >= self.cancel_grace_s:
                    log.warning(
                        "job %s ignored its cancel for %g s: stopping its worker", lease.job_id, self.cancel_grace_s
                    )
                    self._kill(slot)
                    self._decide(lease, "canceled", "canceled", "canceled by request")

    def _kill(self, slot: _Slot) -> None:
        with self._lock:
            if slot in self._slots:
                self._slots.remove(slot)
        _stop_process(slot.proc, slot.conn)

    def _decide(self, lease: Lease, state: str, code: str, message: str) -> None:
        """Record the verdict on a job whose worker was killed (only while that attempt still owns it: it may
        have just finished), clean up after the dead worker, and report it."""
        with transaction(self._factory) as s:
            won = lifecycle.fail_running(
                s, lease.job_id, attempts=lease.attempt, worker=lease.worker, code=code, message=message, state=state
            )
            job = s.get(Job, lease.job_id)
            tenant_id, final = (job.tenant_id, job.state) if job is not None else (None, None)
        self._clean_after(lease, tenant_id, results=won)
        if won:
            self._after(JobOutcome(lease.job_id, state, error_code=code))
        elif final is not None:
            self.job_terminal(lease.job_id)  # it ended on its own just before the kill

    def _handle_crash(self, lease: Lease, message: str) -> None:
        """A worker process died (segfault in a decoder, OOM kill), or could not run the job: retry or fail it."""
        outcome = None
        with transaction(self._factory) as s:
            job = s.get(Job, lease.job_id)
            if job is None:
                return
            tenant_id, state = job.tenant_id, job.state
            owned = lifecycle.still_owned(s, lease)
            if owned and job.attempts >= self.settings.job_max_attempts:
                if lifecycle.fail_running(
                    s,
                    lease.job_id,
                    attempts=lease.attempt,
                    worker=lease.worker,
                    code="worker_crashed",
                    message=message,
                ):
                    outcome = JobOutcome(lease.job_id, "failed", error_code="worker_crashed")
            elif owned:
                lifecycle.requeue_running(s, lease.job_id, attempts=lease.attempt, worker=lease.worker)
        self._clean_after(lease, tenant_id, results=owned)
        if outcome is not None:
            self._after(outcome)
        elif state != "running":
            self.job_terminal(lease.job_id)  # it ended before the worker died, unreported

    def _clean_after(self, lease: Lease, tenant_id: str | None, *, results: bool) -> None:
        """What a killed worker left: its scratch folder and, when its attempt did not publish a result, that
        attempt's own files (never another attempt's)."""
        sweep_scratch(self.settings.work_dir, job_id=lease.job_id)
        if results and tenant_id is not None:
            try:
                self._store.blobs.delete_prefix(lifecycle.result_prefix(tenant_id, lease.job_id, lease.attempt))
            except (MstarError, OSError) as err:
                log.warning("job %s: could not remove partial results: %s", lease.job_id, err)

    def _replace_workers(self) -> None:
        while not self._stop.is_set() and time.monotonic() >= self._respawn_at:
            with self._lock:
                if len(self._slots) >= self.settings.runner_workers:
                    return
            parent, child = self._mp.Pipe()
            proc = self._mp.Process(
                target=_worker_main,
                args=(child, self.settings, self.pipeline, os.getpid()),
                name="mstar-worker",
                daemon=False,
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
                idle = next((s for s in self._slots if s.ready and s.lease is None), None)
            if idle is None:
                return
            with transaction(self._factory) as s:
                lease = lifecycle.claim_fair(s, self.worker_name, max_running=self.settings.tenant_max_running)
            if lease is None:
                return
            log.info("job %s claimed (attempt %d)", lease.job_id, lease.attempt)
            idle.lease, idle.started, idle.cancel_seen = lease, time.monotonic(), None
            try:
                idle.conn.send((lease, self.pipeline, self.soft_s))
            except (OSError, ValueError):  # the worker died just now: its job is retried or failed
                self._lost(idle)
