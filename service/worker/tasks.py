"""The one Celery task: run an analysis job by id through `service.runner.execute_job`.

The message carries only the job id; the slide, options and results live in the job store and the blob store.
The task claims the job row first (`service.worker.jobs.claim`), so duplicate deliveries do nothing, and keeps
a heartbeat while it runs. The pool master's side (`JobRequest`) writes the verdict when a child dies or hits
the hard time limit, because then no code runs in the child any more, and sends that failure's webhook from a
short-lived thread (HTTP retries never block the master's event loop). Every sender goes through
`service.webhooks.claim`, so a job's terminal webhook has one sender at a time whoever decided its state.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from typing import Any

from billiard.exceptions import SoftTimeLimitExceeded, WorkerLostError
from celery import Celery, Task
from celery.worker.request import Request
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from service.config import Settings
from service.errors import JobTimeLimitError
from service.store.db import make_engine, session_factory, transaction
from service.worker import jobs

log = logging.getLogger("mstar.worker")

_FACTORIES: dict[tuple[int, str, bool], sessionmaker[Session]] = {}


def _factory(settings: Settings, *, master: bool = False) -> sessionmaker[Session]:
    """A session factory for this process. The pool master holds no pooled connections (its children fork)."""
    key = (os.getpid(), settings.db_url, master)
    if key not in _FACTORIES:
        url = settings.db_url
        if master and make_url(url).get_backend_name() != "sqlite":
            engine = create_engine(url, poolclass=NullPool)
        else:
            engine = make_engine(url)
        _FACTORIES[key] = session_factory(engine)
    return _FACTORIES[key]


def _with_soft_limit(fn: Callable[..., dict]) -> Callable[..., dict]:
    """Turn Celery's soft time limit into a typed job failure (`time_limit`) instead of an internal error."""

    def run(*args: Any, **kwargs: Any) -> dict:
        try:
            return fn(*args, **kwargs)
        except SoftTimeLimitExceeded as err:
            raise JobTimeLimitError("the job exceeded its soft time limit and was stopped") from err

    return run


class _Heartbeat(threading.Thread):
    """Refreshes the job's lease while it runs, so a long stage without progress calls is not taken over."""

    def __init__(self, factory: sessionmaker[Session], job_id: str, worker: str, attempt: int, every: float):
        super().__init__(name=f"heartbeat-{job_id[:8]}", daemon=True)
        self.factory, self.job_id, self.worker, self.attempt, self.every = factory, job_id, worker, attempt, every
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.every):
            try:
                with transaction(self.factory) as s:
                    if not jobs.heartbeat(s, self.job_id, self.worker, self.attempt):
                        return
            except Exception:  # the database may blip; the next beat retries
                log.warning("heartbeat for job %s failed", self.job_id, exc_info=True)


class JobRequest(Request):
    """Runs in the pool master: records why a job ended when its child could not (crash, hard time limit)."""

    def _job_and_worker(self) -> tuple[str, str] | None:
        args = self.args or ()
        job_id = args[0] if args else (self.kwargs or {}).get("job_id")
        if not job_id or not self.worker_pid:
            return None
        return str(job_id), f"{self.hostname}:{self.worker_pid}"

    def on_timeout(self, soft: bool, timeout: float) -> None:
        if not soft:
            self._record(lambda s, job_id, worker: jobs.on_hard_timeout(s, job_id, worker, timeout) and "failed")
        super().on_timeout(soft, timeout)

    def on_failure(self, exc_info, send_failed_event: bool = True, return_ok: bool = False) -> None:
        exc = getattr(exc_info.exception, "exc", exc_info.exception)  # unwrap ExceptionWithTraceback
        cancelled = getattr(self, "_already_cancelled", False) or getattr(self, "_already_revoked", False)
        if isinstance(exc, WorkerLostError | SystemExit | KeyboardInterrupt) and not cancelled:
            settings: Settings = self.task.app.mstar_settings
            why = re.sub(r"\s*Job: \d+\.?$", "", str(exc).strip()) or type(exc).__name__
            self._record(
                lambda s, job_id, worker: jobs.on_child_lost(
                    s, job_id, worker, max_attempts=settings.job_max_attempts, why=why
                )
            )
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

    def _record(self, fn: Callable[[Session, str, str], Any]) -> None:
        """Write the verdict; when it made the job terminal ("failed"), send its webhook off this thread."""
        ids = self._job_and_worker()
        if ids is None:
            return
        settings: Settings = self.task.app.mstar_settings
        factory = _factory(settings, master=True)
        try:
            with transaction(factory) as s:
                verdict = fn(s, *ids)
            log.warning("job %s on %s: %s", ids[0], ids[1], verdict or "ignored")
        except Exception:  # never let a database problem take the master down; the lease recovers the job
            log.exception("could not record the verdict for job %s", ids[0])
            return
        if verdict == "failed":
            from service import webhooks

            webhooks.send_in_background(factory, ids[0], settings)


class JobTask(Task):
    Request = JobRequest
    acks_late = True
    reject_on_worker_lost = True
    ignore_result = True


def run_job(self: Task, job_id: str) -> dict:
    """Claim the job row, run it with a heartbeat, deliver its webhook. Returns a small summary (not stored)."""
    from service.runner import execute_job, load_callable

    settings: Settings = self.app.mstar_settings
    worker = f"{self.request.hostname}:{os.getpid()}"
    factory = _factory(settings)
    lease = settings.worker_lease_s
    deadline = time.monotonic() + lease + 1.0
    try:
        while True:
            with transaction(factory) as s:
                got = jobs.claim(s, job_id, worker, max_attempts=settings.job_max_attempts, lease_s=lease)
            if not got.duplicate or time.monotonic() > deadline:
                break
            time.sleep(min(1.0, lease / 4))  # is the holder alive? its lease says so within one period
    except DBAPIError as err:  # the job store is unreachable: keep the job, try again shortly
        log.warning("job %s: database unavailable (%s), retrying", job_id, type(err).__name__)
        raise self.retry(exc=err, countdown=5, max_retries=None) from err
    if got.action != "run":
        log.info("job %s skipped: %s", job_id, got.reason)
        _webhook(settings, factory, job_id)  # the claim may have ended it (canceled, out of attempts)
        return {"job_id": job_id, "skipped": got.reason}
    log.info("job %s attempt %d on %s", job_id, got.attempt, worker)
    if got.attempt > 1:  # a previous attempt died mid-job: drop its half-written scratch directory
        for stale in settings.work_dir.glob(f"job-{job_id}-*"):
            shutil.rmtree(stale, ignore_errors=True)
    beat = _Heartbeat(factory, job_id, worker, got.attempt, every=max(0.2, settings.worker_lease_s / 4))
    beat.start()
    try:
        outcome = execute_job(job_id, settings, pipeline=_with_soft_limit(load_callable(settings.pipeline)))
    finally:
        beat.done.set()
    _webhook(settings, factory, job_id)
    return {"job_id": job_id, "state": outcome.state, "attempt": got.attempt, "error": outcome.error_code}


def _webhook(settings: Settings, factory: sessionmaker[Session], job_id: str) -> None:
    """Deliver the terminal webhook if the job is terminal and no one else claimed it (a no-op otherwise)."""
    from service import webhooks

    try:
        webhooks.send_for_job(factory, job_id, settings)
    except Exception:  # the job is done either way; the receiver can poll GET /jobs/{id}
        log.exception("webhook for job %s failed", job_id)


def register(app: Celery, settings: Settings) -> Task:
    """Attach the task to `app` (one app per settings; workers build theirs in `mstar worker`)."""
    return app.task(name="mstar.run_job", base=JobTask, bind=True)(run_job)
