"""Job-row guards for distributed workers: claim, take over, heartbeat, and the verdicts the pool master writes.

Celery delivers at least once; these conditional UPDATEs make the *job row* change state exactly once:

* `claim` moves `queued -> running` and bumps `attempts` (`WHERE state='queued'`), or takes over a `running` job
  whose heartbeat is older than the lease (`WHERE state='running' AND attempts=N AND heartbeat_at < cutoff`):
  that is a redelivery after a whole worker died. A running job with a fresh heartbeat is a duplicate message
  and is dropped, since the worker running it still holds its own unacked copy.
* Out of attempts, the job fails with `worker_lost` instead of running again (no poison-message loop).
* A duplicate delivery waits one lease before giving up (`service.worker.tasks.run_job`): if the holder
  died without a verdict (its master could not reach the database), the lease expires and it takes over.
* `reap_stale` (run by the gateway's `CeleryQueue`) requeues running jobs whose lease expired long ago, for the
  rare case where no message is left to redeliver them.
* `heartbeat` keeps the lease fresh while a stage runs without progress callbacks.
* `on_child_lost` / `on_hard_timeout` run in the pool master, guarded by the child's `worker` tag and attempt
  in the UPDATE itself, so a verdict never lands on a job another worker has taken over since.

Terminal writes only move `queued`/`running` rows, and the failures decided here are conditional UPDATEs checked
by row count: a job reaches its terminal state once, and its webhook has one sender at a time
(`service.webhooks.claim`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.store import repo
from service.store.models import TERMINAL_STATES, Job, utcnow


@dataclass(frozen=True)
class Claim:
    """What a delivered task should do: `run` it as attempt `attempt`, or `skip` it (and why)."""

    action: str  # "run" | "skip"
    attempt: int = 0
    reason: str = ""
    duplicate: bool = False  # skipped because another worker holds a fresh lease


def claim(s: Session, job_id: str, worker: str, *, max_attempts: int, lease_s: float) -> Claim:
    job = s.get(Job, job_id)
    if job is None:
        return Claim("skip", reason="missing")
    if job.state not in ("queued", "running"):
        return Claim("skip", reason=f"already {job.state}")
    if job.cancel_requested:
        repo.finish_job(s, job_id, "canceled", error_code="canceled", error_message="canceled by request")
        return Claim("skip", reason="canceled")
    attempts = int(job.attempts or 0)
    if job.state == "running":
        cutoff = repo.stale_cutoff(lease_s)
        heartbeat = job.heartbeat_at
        if heartbeat is not None and heartbeat.tzinfo is None:  # SQLite returns naive datetimes
            heartbeat = heartbeat.replace(tzinfo=cutoff.tzinfo)
        if heartbeat is not None and heartbeat >= cutoff:
            return Claim("skip", reason=f"running on {job.worker} (duplicate delivery)", duplicate=True)
    if attempts >= max_attempts:
        repo.finish_job(
            s,
            job_id,
            "failed",
            error_code="worker_lost",
            error_message=f"the worker stopped during this job {attempts} times; giving up",
        )
        return Claim("skip", reason="out of attempts")
    now = utcnow()
    n = s.execute(
        update(Job)
        .where(Job.id == job_id, Job.attempts == attempts, Job.state == job.state)
        .values(
            state="running",
            worker=worker,
            started_at=now,
            heartbeat_at=now,
            attempts=attempts + 1,
            stage="open",
            progress=0.0,
            error_code=None,
            error_message=None,
        )
        .execution_options(synchronize_session=False)
    ).rowcount
    if n != 1:
        return Claim("skip", reason="claimed by another worker")
    return Claim("run", attempt=attempts + 1)


def heartbeat(s: Session, job_id: str, worker: str, attempt: int) -> bool:
    """Refresh the lease; False once the job is no longer ours (finished, taken over, deleted)."""
    n = s.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == "running", Job.worker == worker, Job.attempts == attempt)
        .values(heartbeat_at=utcnow())
        .execution_options(synchronize_session=False)
    ).rowcount
    return n == 1


def _running_on(s: Session, job_id: str, worker: str) -> Job | None:
    job = s.scalar(select(Job).where(Job.id == job_id, Job.state == "running", Job.worker == worker))
    return job


def _fail_running(
    s: Session,
    job_id: str,
    *,
    attempts: int,
    code: str,
    message: str,
    worker: str | None = None,
    silent_since: datetime | None = None,
) -> bool:
    """Fail a `running` job still in attempt `attempts` (and on `worker` / silent since `silent_since` when
    given); True only for the caller whose UPDATE moved the row, so exactly one party reports the failure."""
    cond = [Job.id == job_id, Job.state == "running", Job.attempts == attempts]
    if worker is not None:
        cond.append(Job.worker == worker)
    if silent_since is not None:
        cond.append(Job.heartbeat_at.is_(None) | (Job.heartbeat_at < silent_since))
    n = s.execute(
        update(Job)
        .where(*cond)
        .values(state="failed", finished_at=utcnow(), error_code=code, error_message=message)
        .execution_options(synchronize_session=False)
    ).rowcount
    return n == 1


def on_child_lost(s: Session, job_id: str, worker: str, *, max_attempts: int, why: str) -> str:
    """The pool child running the job died (decoder abort, segfault, OOM kill). Requeue it or fail it.

    Called before Celery requeues the message, so the redelivery finds the job `queued` and claims it at once.
    Returns "requeued", "failed" or "ignored" (not ours any more).
    """
    job = _running_on(s, job_id, worker)
    if job is None:
        return "ignored"
    if job.attempts >= max_attempts:
        won = _fail_running(
            s,
            job_id,
            attempts=job.attempts,
            worker=worker,
            code="worker_crashed",
            message=f"the worker process died while processing this slide ({why}), {job.attempts} time(s); giving up",
        )
        return "failed" if won else "ignored"
    n = s.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == "running", Job.worker == worker, Job.attempts == job.attempts)
        .values(state="queued", worker=None, stage=None, progress=0.0)
        .execution_options(synchronize_session=False)
    ).rowcount
    return "requeued" if n == 1 else "ignored"


def on_hard_timeout(s: Session, job_id: str, worker: str, limit_s: float) -> bool:
    """The hard time limit killed the child: fail the job with the reason (no retry: it would hang again)."""
    job = _running_on(s, job_id, worker)
    if job is None:
        return False
    return _fail_running(
        s,
        job_id,
        attempts=job.attempts,
        worker=worker,
        code="time_limit",
        message=f"the job exceeded its hard time limit of {limit_s:g} s and was stopped",
    )


@dataclass
class Reaped:
    """What `reap_stale` did: jobs to re-publish, and jobs it failed (their webhooks are due)."""

    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def reap_stale(s: Session, *, lease_s: float, max_attempts: int) -> Reaped:
    """Requeue `running` jobs silent for two leases, or fail them once out of attempts."""
    cutoff = repo.stale_cutoff(2 * lease_s)
    rows = s.execute(
        select(Job.id, Job.attempts).where(
            Job.state == "running", (Job.heartbeat_at.is_(None)) | (Job.heartbeat_at < cutoff)
        )
    ).all()
    out = Reaped()
    for job_id, attempts in rows:
        if (attempts or 0) >= max_attempts:
            if _fail_running(
                s,
                job_id,
                attempts=attempts,
                silent_since=cutoff,
                code="worker_lost",
                message=f"the worker stopped during this job {attempts} times; giving up",
            ):
                out.failed.append(job_id)
            continue
        n = s.execute(
            update(Job)
            .where(
                Job.id == job_id,
                Job.state == "running",
                Job.attempts == attempts,
                (Job.heartbeat_at.is_(None)) | (Job.heartbeat_at < cutoff),
            )
            .values(state="queued", worker=None, stage=None, progress=0.0)
            .execution_options(synchronize_session=False)
        ).rowcount
        if n == 1:
            out.requeued.append(job_id)
    return out


def unreported(
    s: Session, *, settled_s: float, window_s: float, reclaim_after_s: float | None = None, limit: int = 200
) -> list[str]:
    """Terminal jobs with a webhook nobody has claimed, finished between `window_s` and `settled_s` ago: a
    verdict whose writer died before sending, or a terminal change made where no sender runs (e.g. a queued
    job canceled through the API). With `reclaim_after_s`, also those whose sender claimed the webhook that
    long ago and never finished (it died mid-delivery). Older ones are left alone (a database upgraded from an
    older version)."""
    now = utcnow()
    nobody = Job.webhook_claimed_at.is_(None)
    if reclaim_after_s is not None:
        nobody = nobody | (
            Job.webhook_sent_at.is_(None) & (Job.webhook_claimed_at < now - timedelta(seconds=reclaim_after_s))
        )
    q = (
        select(Job.id)
        .where(
            Job.state.in_(TERMINAL_STATES),
            Job.webhook_url.is_not(None),
            nobody,
            Job.finished_at < now - timedelta(seconds=settled_s),
            Job.finished_at >= now - timedelta(seconds=window_s),
        )
        .order_by(Job.finished_at)
        .limit(limit)
    )
    return list(s.scalars(q))
