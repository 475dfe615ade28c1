"""The one Celery task. A message is a token for one job of its queue: the task claims the next job fairly
(`lifecycle.claim_fair`, or takes back the job a previous delivery of the same token claimed if that worker died),
keeps its heartbeat, runs it through `service.jobs.execute.execute_job` and sends its webhook.

The pool master's side (`JobRequest`) writes the verdict when a child dies or hits the hard time limit, because
then no code runs in the child any more; it finds the child's job by the child's worker tag (host:pid), and sends
that failure's webhook from a short-lived thread. Pool children die with their master (parent-death signal), so
a master killed on its own leaves no child running a job that another worker takes over.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable
from typing import Any

from billiard.exceptions import SoftTimeLimitExceeded, WorkerLostError
from celery import Celery, Task
from celery.signals import worker_process_init, worker_process_shutdown
from celery.worker.request import Request
from sqlalchemy import create_engine, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from service.config import Settings
from service.errors import JobTimeLimitError
from service.jobs import lifecycle
from service.jobs.celery_app import TASK_NAME, make_celery
from service.jobs.celery_queue import publish_token
from service.jobs.embedded import die_with_parent
from service.jobs.execute import execute_job, load_callable, sweep_scratch
from service.jobs.resources import open_store
from service.obs import tracing, worker_metrics
from service.store.db import session_factory, transaction
from service.store.models import Job

log = logging.getLogger("mstar.worker")

_MASTER_FACTORIES: dict[tuple[int, str], sessionmaker[Session]] = {}


@worker_process_init.connect
def _child_dies_with_master(**_kwargs: Any) -> None:
    die_with_parent(os.getppid())
    if tracing.setup("mstar-worker"):  # after the fork: this child's own export thread
        tracing.instrument_celery()


@worker_process_shutdown.connect
def _child_exits(pid: int | None = None, **_kwargs: Any) -> None:
    worker_metrics.process_dead(pid or os.getpid())  # replaced children (memory cap) stop counting as running


def _master_factory(settings: Settings) -> sessionmaker[Session]:
    """The pool master's sessions: no pooled connections (its children fork from it)."""
    key = (os.getpid(), settings.db_url)
    if key not in _MASTER_FACTORIES:
        url = settings.db_url
        if make_url(url).get_backend_name() != "sqlite":
            _MASTER_FACTORIES[key] = session_factory(create_engine(url, poolclass=NullPool))
        else:
            _MASTER_FACTORIES[key] = open_store(settings).sessions
    return _MASTER_FACTORIES[key]


def _with_soft_limit(fn: Callable[..., dict]) -> Callable[..., dict]:
    """Turn Celery's soft time limit into a typed job failure (`time_limit`) instead of an internal error."""

    def run(*args: Any, **kwargs: Any) -> dict:
        try:
            return fn(*args, **kwargs)
        except SoftTimeLimitExceeded as err:
            raise JobTimeLimitError("the job exceeded its soft time limit and was stopped") from err

    run.mstar_inner = fn  # type: ignore[attr-defined]  (so the worker still reuses its model backend)
    return run


class _Heartbeat(threading.Thread):
    """Refreshes the job's lease while it runs, so a long stage without progress calls is not taken over."""

    def __init__(self, factory: sessionmaker[Session], lease: lifecycle.Lease, every: float):
        super().__init__(name=f"heartbeat-{lease.job_id[:8]}", daemon=True)
        self.factory, self.lease, self.every = factory, lease, every
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.every):
            try:
                with transaction(self.factory) as s:
                    if not lifecycle.heartbeat(s, self.lease):
                        return
            except Exception:  # the database may blip; the next beat retries
                log.warning("heartbeat for job %s failed", self.lease.job_id, exc_info=True)


class JobRequest(Request):
    """Runs in the pool master: records why a job ended when its child could not (crash, hard time limit)."""

    def _worker_tag(self) -> str | None:
        return f"{self.hostname}:{self.worker_pid}" if self.worker_pid else None

    def on_timeout(self, soft: bool, timeout: float) -> None:
        if not soft:  # the child is killed
            if self._record(lambda s, w: _failed(*lifecycle.on_hard_timeout(s, w, timeout))) == "failed":
                worker_metrics.verdict("failed", "time_limit")
            worker_metrics.process_dead(self.worker_pid)
        super().on_timeout(soft, timeout)

    def on_failure(self, exc_info, send_failed_event: bool = True, return_ok: bool = False) -> None:
        exc = getattr(exc_info.exception, "exc", exc_info.exception)  # unwrap ExceptionWithTraceback
        cancelled = getattr(self, "_already_cancelled", False) or getattr(self, "_already_revoked", False)
        if isinstance(exc, WorkerLostError | SystemExit | KeyboardInterrupt) and not cancelled:
            settings: Settings = self.task.app.mstar_settings
            why = re.sub(r"\s*Job: \d+\.?$", "", str(exc).strip()) or type(exc).__name__

            def lost(s: Session, worker: str) -> tuple[str, str | None]:
                return lifecycle.on_child_lost(s, worker, max_attempts=settings.job_max_attempts, why=why)

            if self._record(lost) == "failed":
                worker_metrics.verdict("failed", "worker_crashed")
            worker_metrics.process_dead(self.worker_pid)
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

    def _record(self, fn: Callable[[Session, str], tuple[str | None, str | None]]) -> str | None:
        """Write the verdict and return it; when it made the job terminal ("failed"), send its webhook off this
        thread."""
        worker = self._worker_tag()
        if worker is None:
            return None
        settings: Settings = self.task.app.mstar_settings
        factory = _master_factory(settings)
        try:
            with transaction(factory) as s:
                verdict, job_id = fn(s, worker)
            log.warning("job %s on %s: %s", job_id, worker, verdict or "ignored")
        except Exception:  # never let a database problem take the master down; the lease recovers the job
            log.exception("could not record the verdict for the job on %s", worker)
            return None
        if verdict == "failed" and job_id:
            from service import webhooks

            webhooks.send_in_background(factory, job_id, settings)
        return verdict


def _failed(won: bool, job_id: str | None) -> tuple[str | None, str | None]:
    return ("failed" if won else None), job_id


class JobTask(Task):
    Request = JobRequest
    acks_late = True
    reject_on_worker_lost = True
    ignore_result = True


def _claim(task: Task, settings: Settings, factory: sessionmaker[Session], worker: str, queue: str):
    """The lease this delivery runs, or None with why. While the job an earlier delivery of this token claimed
    still has a fresh heartbeat its holder may be alive: wait up to one lease for it to go stale."""
    lease_s = settings.worker_lease_s
    deadline = time.monotonic() + lease_s + 1.0
    while True:
        with transaction(factory) as s:
            got = lifecycle.claim_for_token(
                s,
                task.request.id,
                worker,
                queue=queue,
                max_attempts=settings.job_max_attempts,
                lease_s=lease_s,
                max_running=settings.tenant_max_running,
            )
        if got.lease is not None or not got.wait or "cap" in got.why or time.monotonic() > deadline:
            return got
        time.sleep(min(1.0, lease_s / 4))


def run_job(self: Task, job_id: str) -> dict:
    """Claim a job fairly, run it with a heartbeat, deliver its webhook. Returns a small summary (not stored)."""
    settings: Settings = self.app.mstar_settings
    worker = f"{self.request.hostname}:{os.getpid()}"
    factory = open_store(settings).sessions
    delivery = self.request.delivery_info or {}
    queue = delivery.get("routing_key") or _queue_of(factory, job_id)
    try:
        got = _claim(self, settings, factory, worker, queue)
    except DBAPIError as err:  # the job store is unreachable: keep the token, try again shortly
        log.warning("token for %s: database unavailable (%s), retrying", queue, type(err).__name__)
        raise self.retry(exc=err, countdown=5, max_retries=None) from err
    lease, why = got.lease, got.why
    if lease is None:
        if got.wait and "cap" in why:  # every waiting tenant is at its running cap: this token comes back shortly
            raise self.retry(countdown=2, max_retries=None)
        log.info("token for job %s on %s: %s", job_id, queue, why)
        _webhook(settings, factory, job_id)  # a take-over may have ended it (canceled, out of attempts)
        return {"job_id": job_id, "skipped": why}
    log.info("job %s attempt %d on %s (%s)", lease.job_id, lease.attempt, worker, why)
    if lease.attempt > 1:  # a previous attempt died mid-job: drop its half-written scratch folder
        sweep_scratch(settings.work_dir, job_id=lease.job_id)
    beat = _Heartbeat(factory, lease, every=max(0.2, settings.worker_lease_s / 4))
    beat.start()
    worker_metrics.job_started()
    outcome = None
    try:
        outcome = execute_job(lease, settings, pipeline=_with_soft_limit(load_callable(settings.pipeline)))
    finally:
        beat.done.set()
        worker_metrics.job_ended(outcome)
    for done in outcome.terminal_ids:
        _webhook(settings, factory, done)
    for released in outcome.released:  # followers of a failed job run themselves now: one token each
        publish_token(self.app, released, _queue_of(factory, released))
    return {"job_id": lease.job_id, "state": outcome.state, "attempt": lease.attempt, "error": outcome.error_code}


def _queue_of(factory: sessionmaker[Session], job_id: str) -> str:
    with transaction(factory) as s:
        return s.scalar(select(Job.queue).where(Job.id == job_id)) or lifecycle.INTERACTIVE


def _webhook(settings: Settings, factory: sessionmaker[Session], job_id: str) -> None:
    """Queue the terminal webhook (sent if the job is terminal and no one else claimed it) on this process's
    senders: delivered on the job slot, a hanging receiver held the slot, and every tenant's next job, for a
    minute."""
    from service import webhooks

    webhooks.process_deliveries(factory, settings).submit(job_id)


def register(app: Celery, settings: Settings) -> Task:
    """Attach the task to `app` (one app per settings)."""
    return app.task(name=TASK_NAME, base=JobTask, bind=True)(run_job)


def worker_app(settings: Settings) -> Celery:
    """The Celery app a worker runs: the shared configuration plus the task."""
    app = make_celery(settings)
    register(app, settings)
    return app
