"""Every change of a job row, in one place: create, claim (fairly, with a fencing token), progress, finish,
cancel, take over, recover. Nothing else in the service writes `jobs.state`.

The fencing token is the attempt number together with the worker tag that claimed it (`Lease`). Every write a
worker makes is a conditional UPDATE `WHERE state='running' AND attempts=N AND worker=W`, checked by row count, so
a worker that lost its job (taken over after its gateway died, requeued by a sweep, canceled, deleted) can never
overwrite the verdict of the attempt that owns it, and learns that it lost at its next write. Each attempt writes
its files under its own prefix (`results/<tenant>/<job>/<attempt>/`), so a losing attempt only ever removes its own.

Fair dispatch: a claim takes the oldest queued job of the tenant with the fewest running jobs (tenants at their
running cap wait), so one tenant's 200 queued jobs do not stand in front of another tenant's one. The embedded
dispatcher and Celery workers claim the same way: a Celery message is a token that says "run one job from this
queue", not "run job X" (see `service.worker.tasks`).

Identical work runs once: a job whose slide, bundle and options match a succeeded job of the same tenant takes
its result at once; one that matches a queued or running job `follows` it and is finished with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.errors import IdempotencyConflictError, QuotaExceededError
from service.store.models import JOB_STATES, TERMINAL_STATES, Job, Result, Tenant, new_id, utcnow

INTERACTIVE, BATCH = "interactive", "batch"
QUEUES = (INTERACTIVE, BATCH)


@dataclass(frozen=True)
class Lease:
    """Who owns a running job: the fencing token every worker write is conditioned on."""

    job_id: str
    worker: str
    attempt: int
    # the W3C traceparent the job was submitted under: a worker with no trace of its own continues it
    trace_parent: str | None = field(default=None, compare=False)


def result_prefix(tenant_id: str, job_id: str, attempt: int | None = None) -> str:
    """Blob prefix of a job's files; with `attempt`, only that attempt's (all a losing attempt may remove)."""
    base = f"results/{tenant_id}/{job_id}"
    return base if attempt is None else f"{base}/{attempt}"


def _owned(lease: Lease):
    return (
        Job.id == lease.job_id,
        Job.state == "running",
        Job.attempts == lease.attempt,
        Job.worker == lease.worker,
    )


def _set(s: Session, *where, **values) -> int:
    return s.execute(update(Job).where(*where).values(**values).execution_options(synchronize_session=False)).rowcount


# --- create ---------------------------------------------------------------------------------------------------


def _by_idem(s: Session, tenant_id: str, key: str | None) -> Job | None:
    return s.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key))


def _replay(found: Job, request_sha256: str | None) -> tuple[Job, bool]:
    if request_sha256 is not None and found.request_sha256 not in (None, request_sha256):
        raise IdempotencyConflictError(
            "this Idempotency-Key was already used with a different request; use a new key for a new request"
        )
    return found, False


def create(
    s: Session,
    *,
    tenant_id: str,
    slide_id: str,
    options: dict,
    idempotency_key: str | None = None,
    webhook_url: str | None = None,
    request_sha256: str | None = None,
    max_queued: int | None = None,
    cache_key: str | None = None,
    reuse: bool = True,
    job_id: str | None = None,
) -> tuple[Job, bool]:
    """(job, created). The same idempotency key from the same tenant returns the first job if it was asked with
    the same request (`request_sha256`), and is refused (422) with a different one. Past `max_queued` queued jobs
    of this tenant a submit is refused (429) and nothing is recorded. With `cache_key` and `reuse`, an identical
    succeeded job lends its result (the new job is born succeeded) and an identical unfinished one is followed.
    `job_id` names the new row in advance (what it carries, e.g. an RNA profile, is stored before it exists)."""
    if idempotency_key:
        found = _by_idem(s, tenant_id, idempotency_key)
        if found is not None:
            return _replay(found, request_sha256)
    queue = BATCH if options.get("batch_id") else INTERACTIVE
    if max_queued is not None:
        # each queue against its own count: a tenant's 1,000-line batch (which never asks for the quota) left the
        # same tenant's interactive uploads refused with 429
        in_queue = func.coalesce(Job.queue, INTERACTIVE) == queue
        queued = s.scalar(select(func.count()).where(Job.tenant_id == tenant_id, Job.state == "queued", in_queue))
        if (queued or 0) >= max_queued:
            raise QuotaExceededError(
                f"this tenant already has {queued} queued {queue} jobs (the limit is {max_queued}); retry when some "
                "finish"
            )
    now = utcnow()
    job = Job(
        id=job_id or new_id(),
        tenant_id=tenant_id,
        slide_id=slide_id,
        state="queued",
        options=options,
        queue=queue,
        idempotency_key=idempotency_key or None,
        request_sha256=request_sha256 if idempotency_key else None,
        webhook_url=webhook_url,
        progress=0.0,
        attempts=0,
        stage_seconds={},
        cache_key=cache_key,
        created_at=now,
    )
    donor = _identical(s, tenant_id, slide_id, cache_key) if cache_key and reuse else None
    if donor is not None and donor.state == "succeeded":
        result = s.get(Result, donor.id)
        job.state, job.stage, job.progress = "succeeded", "done", 1.0
        job.started_at = job.finished_at = now
        job.options = {**options, "reused_from": donor.id}
    elif donor is not None:
        job.follows = donor.id
    try:
        with s.begin_nested():
            s.add(job)
            if donor is not None and donor.state == "succeeded":
                s.add(Result(job_id=job.id, tenant_id=tenant_id, files=dict(result.files), created_at=now))
    except IntegrityError:
        found = _by_idem(s, tenant_id, idempotency_key)
        if found is None:
            raise
        return _replay(found, request_sha256)
    return job, True


def _identical(s: Session, tenant_id: str, slide_id: str, cache_key: str) -> Job | None:
    """The newest job of this tenant and slide with the same cache key that succeeded (with a result), else the
    newest one still under way that runs itself (not following another)."""
    q = (
        select(Job)
        .where(
            Job.tenant_id == tenant_id,
            Job.slide_id == slide_id,
            Job.cache_key == cache_key,
            Job.state.in_(("succeeded", "queued", "running")),
            Job.follows.is_(None),
        )
        .order_by(Job.created_at.desc())
        .limit(16)
    )
    rows = list(s.scalars(q))
    done = next((j for j in rows if j.state == "succeeded" and s.get(Result, j.id) is not None), None)
    return done or next((j for j in rows if j.state != "succeeded"), None)


# --- claim ----------------------------------------------------------------------------------------------------


def _claim_values(worker: str, now: datetime, token: str | None) -> dict:
    return {
        "state": "running",
        "worker": worker,
        "started_at": now,
        "heartbeat_at": now,
        "attempts": Job.attempts + 1,
        "stage": "open",
        "progress": 0.0,
        "error_code": None,
        "error_message": None,
        "claim_token": token,
    }


def claim_fair(
    s: Session,
    worker: str,
    *,
    queue: str | None = None,
    max_running: int = 0,
    token: str | None = None,
) -> Lease | None:
    """Claim the next job fairly across tenants, or None: the tenant with the fewest jobs running, among those
    the one served least recently (whose latest job started longest ago, or never), then its oldest job. Without
    the second rule one worker slot served a tenant's whole backlog before another tenant's one job: whenever the
    slot came free both had none running, and the older queued job won every time.

    `queue` limits it to one queue (Celery tokens); None takes interactive jobs before batch ones. Tenants with
    `max_running` jobs running (0 = no cap) are passed over."""
    running = dict(
        s.execute(select(Job.tenant_id, func.count()).where(Job.state == "running").group_by(Job.tenant_id)).all()
    )
    for q in (queue,) if queue else QUEUES:
        in_queue = func.coalesce(Job.queue, INTERACTIVE) == q
        waiting = s.execute(
            select(Job.tenant_id, func.min(Job.created_at))
            .where(Job.state == "queued", Job.follows.is_(None), in_queue)
            .group_by(Job.tenant_id)
        ).all()
        eligible = [t for t in waiting if not max_running or running.get(t[0], 0) < max_running]
        served = _last_started(s, [t[0] for t in eligible])
        order = sorted(
            eligible,
            key=lambda t: (running.get(t[0], 0), *((0,) if served.get(t[0]) is None else (1, served[t[0]])), t[1]),
        )
        for tenant_id, _ in order:
            candidates = s.scalars(
                select(Job.id)
                .where(Job.tenant_id == tenant_id, Job.state == "queued", Job.follows.is_(None), in_queue)
                .order_by(Job.created_at, Job.id)
                .limit(4)
            ).all()
            for job_id in candidates:
                if _set(s, Job.id == job_id, Job.state == "queued", **_claim_values(worker, utcnow(), token)) == 1:
                    attempt, parent = s.execute(select(Job.attempts, Job.trace_parent).where(Job.id == job_id)).one()
                    return Lease(job_id, worker, int(attempt), parent)
    return None


def _last_started(s: Session, tenants: list[str]) -> dict[str, datetime]:
    """Each tenant's latest job start (`ix_jobs_tenant_started`); tenants never served are absent."""
    if len(tenants) < 2:
        return {}
    latest = (
        select(func.max(Job.started_at))
        .where(Job.tenant_id == Tenant.id, Job.started_at.is_not(None))
        .scalar_subquery()
    )
    rows = s.execute(select(Tenant.id, latest).where(Tenant.id.in_(tenants))).all()
    return {tenant: at for tenant, at in rows if at is not None}


def waiting_for_capacity(s: Session, queue: str, max_running: int) -> bool:
    """Jobs are queued in `queue` but every tenant that has them is at its running cap (a token must wait)."""
    if not max_running:
        return False
    tenants = s.scalars(
        select(Job.tenant_id)
        .where(Job.state == "queued", Job.follows.is_(None), func.coalesce(Job.queue, INTERACTIVE) == queue)
        .distinct()
    ).all()
    return bool(tenants)


@dataclass(frozen=True)
class TakeOver:
    """What a redelivered Celery token found: a lease on its stale job, or why not."""

    lease: Lease | None = None
    reason: str = ""
    holder_alive: bool = False  # the job runs with a fresh heartbeat: maybe a duplicate, maybe its worker dies


def take_over(s: Session, token: str, worker: str, *, max_attempts: int, lease_s: float) -> TakeOver:
    """A redelivered token (same task id) finds the job its first delivery claimed. If that job still runs but
    its heartbeat is older than the lease (the whole worker died), take it over as the next attempt; out of
    attempts, fail it with `worker_lost`."""
    job = s.scalar(select(Job).where(Job.claim_token == token, Job.state == "running"))
    if job is None:
        return TakeOver(reason="no job holds this token")
    if job.cancel_requested:
        finish_unowned(s, job.id, "canceled", error_code="canceled", error_message="canceled by request")
        return TakeOver(reason="canceled")
    cutoff = stale_cutoff(lease_s)
    beat = _aware(job.heartbeat_at, cutoff)
    if beat is not None and beat >= cutoff:
        return TakeOver(reason=f"running on {job.worker}", holder_alive=True)
    attempts = int(job.attempts or 0)
    if attempts >= max_attempts:
        fail_running(
            s,
            job.id,
            attempts=attempts,
            code="worker_lost",
            message=f"the worker stopped during this job {attempts} times; giving up",
        )
        return TakeOver(reason="out of attempts")
    n = _set(
        s,
        Job.id == job.id,
        Job.state == "running",
        Job.attempts == attempts,
        Job.heartbeat_at == job.heartbeat_at,
        **_claim_values(worker, utcnow(), token),
    )
    if n != 1:
        return TakeOver(reason="taken over by another worker")
    return TakeOver(lease=Lease(job.id, worker, attempts + 1, job.trace_parent))


@dataclass(frozen=True)
class TokenClaim:
    """What one delivery of a Celery token gets: a lease, or why not (`wait`: retry this delivery shortly)."""

    lease: Lease | None
    why: str
    wait: bool = False  # the job this token claimed before may still be running, or tenants are at their cap


def claim_for_token(
    s: Session, token: str, worker: str, *, queue: str, max_attempts: int, lease_s: float, max_running: int = 0
) -> TokenClaim:
    """A delivery of token `token` (a Celery task id; a redelivery carries the same one): take back the job an
    earlier delivery of it claimed if that worker died, else claim the next job of `queue` fairly."""
    back = take_over(s, token, worker, max_attempts=max_attempts, lease_s=lease_s)
    if back.lease is not None:
        return TokenClaim(back.lease, "taken over")
    if back.holder_alive:
        return TokenClaim(None, back.reason, wait=True)
    lease = claim_fair(s, worker, queue=queue, max_running=max_running, token=token)
    if lease is not None:
        return TokenClaim(lease, "claimed")
    if waiting_for_capacity(s, queue, max_running):
        return TokenClaim(None, "every waiting tenant is at its running cap", wait=True)
    return TokenClaim(None, back.reason if back.reason != "no job holds this token" else "nothing queued")


def _aware(value: datetime | None, like: datetime) -> datetime | None:
    if value is not None and value.tzinfo is None:  # SQLite returns naive datetimes
        return value.replace(tzinfo=like.tzinfo)
    return value


def stale_cutoff(seconds: float) -> datetime:
    return utcnow() - timedelta(seconds=seconds)


# --- while it runs --------------------------------------------------------------------------------------------


def progress(s: Session, lease: Lease, stage: str, fraction: float, stage_seconds: dict) -> bool:
    """Record progress and refresh the heartbeat; False when the job is no longer this attempt's to run, or a
    cancel was asked for (the worker then stops)."""
    n = _set(
        s,
        *_owned(lease),
        stage=stage,
        progress=max(0.0, min(1.0, float(fraction))),
        stage_seconds=stage_seconds,
        heartbeat_at=utcnow(),
    )
    return n == 1 and not cancel_requested(s, lease.job_id)


def heartbeat(s: Session, lease: Lease) -> bool:
    """Refresh the lease; False once the job is no longer ours (finished, taken over, deleted)."""
    return _set(s, *_owned(lease), heartbeat_at=utcnow()) == 1


def still_owned(s: Session, lease: Lease) -> bool:
    return s.scalar(select(func.count()).where(*_owned(lease))) == 1


def cancel_requested(s: Session, job_id: str) -> bool:
    """True when cancel was asked for, or the job no longer exists (deleted with its slide)."""
    flag = s.scalar(select(Job.cancel_requested).where(Job.id == job_id))
    return flag is None or bool(flag)


# --- finish ---------------------------------------------------------------------------------------------------


@dataclass
class Finished:
    """What a finish changed: whether this caller's write won, and the followers it finished or released."""

    won: bool
    followers_done: list[str] = field(default_factory=list)
    followers_released: list[str] = field(default_factory=list)


def succeed(s: Session, lease: Lease, files: dict, stage_seconds: dict) -> Finished:
    """Record the result and mark the job succeeded, only if this attempt still owns it. Jobs following it get
    the same result and succeed with it."""
    now = utcnow()
    n = _set(
        s,
        *_owned(lease),
        state="succeeded",
        finished_at=now,
        progress=1.0,
        stage="done",
        error_code=None,
        error_message=None,
        stage_seconds=stage_seconds,
    )
    if n != 1:
        return Finished(False)
    job = s.get(Job, lease.job_id, populate_existing=True)
    s.merge(Result(job_id=job.id, tenant_id=job.tenant_id, files=files, created_at=now))
    done = []
    for follower in s.scalars(select(Job).where(Job.follows == job.id, Job.state == "queued")).all():
        moved = _set(
            s,
            Job.id == follower.id,
            Job.state == "queued",
            Job.follows == job.id,
            state="succeeded",
            started_at=now,
            finished_at=now,
            progress=1.0,
            stage="done",
            options={**(follower.options or {}), "reused_from": job.id},
        )
        if moved == 1:
            s.add(Result(job_id=follower.id, tenant_id=follower.tenant_id, files=dict(files), created_at=now))
            done.append(follower.id)
    s.flush()
    return Finished(True, followers_done=done)


def finish(
    s: Session,
    lease: Lease,
    state: str,
    *,
    error_code: str | None = None,
    error_message: str | None = None,
    stage_seconds: dict | None = None,
) -> Finished:
    """A failed or canceled verdict from the attempt that owns the job; False-won when it no longer does.
    Jobs that followed it run on their own now."""
    if state not in ("failed", "canceled"):
        raise ValueError(f"not a failure state: {state}")
    values: dict = {"state": state, "finished_at": utcnow(), "error_code": error_code, "error_message": error_message}
    if stage_seconds is not None:
        values["stage_seconds"] = stage_seconds
    if _set(s, *_owned(lease), **values) != 1:
        return Finished(False)
    return Finished(True, followers_released=release_followers(s, lease.job_id))


def release_followers(s: Session, job_id: str) -> list[str]:
    """The leader will not produce a result: its followers become ordinary queued jobs (to be dispatched)."""
    ids = list(s.scalars(select(Job.id).where(Job.follows == job_id, Job.state == "queued")))
    if ids:
        _set(s, Job.id.in_(ids), Job.state == "queued", follows=None, created_at=utcnow())
    return ids


def finish_unowned(
    s: Session, job_id: str, state: str, *, error_code: str | None = None, error_message: str | None = None
) -> bool:
    """A verdict on a queued or running job by someone who does not run it (a claim that finds it canceled,
    start-up recovery); True when this write moved the row."""
    if state not in TERMINAL_STATES:
        raise ValueError(f"not a terminal state: {state}")
    values: dict = {"state": state, "finished_at": utcnow(), "error_code": error_code, "error_message": error_message}
    if state == "succeeded":
        values.update(progress=1.0, stage="done")
    n = _set(s, Job.id == job_id, Job.state.in_(("queued", "running")), **values)
    if n == 1:
        release_followers(s, job_id)
    return n == 1


def fail_running(
    s: Session,
    job_id: str,
    *,
    attempts: int,
    code: str,
    message: str,
    worker: str | None = None,
    silent_since: datetime | None = None,
    state: str = "failed",
) -> bool:
    """Fail a `running` job still in attempt `attempts` (and on `worker` / silent since `silent_since` when
    given); True only for the caller whose UPDATE moved the row, so exactly one party reports the failure."""
    cond = [Job.id == job_id, Job.state == "running", Job.attempts == attempts]
    if worker is not None:
        cond.append(Job.worker == worker)
    if silent_since is not None:
        cond.append(Job.heartbeat_at.is_(None) | (Job.heartbeat_at < silent_since))
    won = _set(s, *cond, state=state, finished_at=utcnow(), error_code=code, error_message=message) == 1
    if won:
        release_followers(s, job_id)
    return won


def requeue_running(s: Session, job_id: str, *, attempts: int, worker: str | None = None, cond=()) -> bool:
    """Put a running attempt's job back in the queue (its worker died); fenced like every other write."""
    where = [Job.id == job_id, Job.state == "running", Job.attempts == attempts, *cond]
    if worker is not None:
        where.append(Job.worker == worker)
    return _set(s, *where, state="queued", worker=None, stage=None, progress=0.0, claim_token=None) == 1


# --- cancel ---------------------------------------------------------------------------------------------------


def request_cancel(s: Session, job: Job) -> tuple[Job, list[str]]:
    """A queued job is canceled at once; a running one is flagged and its worker stops at the next poll.
    Returns the job and the jobs that followed it and must now run themselves (to be handed to the queue)."""
    released: list[str] = []
    if job.state == "queued":
        n = _set(
            s,
            Job.id == job.id,
            Job.state == "queued",
            state="canceled",
            cancel_requested=True,
            finished_at=utcnow(),
            error_code="canceled",
            error_message="canceled by request",
        )
        if n:
            released = release_followers(s, job.id)
        s.refresh(job)  # lost the race: a worker may have claimed it just now, so look again
        if n:
            return job, released
    if job.state == "running":
        _set(s, Job.id == job.id, Job.state == "running", cancel_requested=True)
    s.refresh(job)
    return job, released


# --- when workers die -----------------------------------------------------------------------------------------


def running_on(s: Session, worker: str) -> Job | None:
    """The job a worker tag (host:pid of one pool child) is running, if any."""
    return s.scalar(select(Job).where(Job.state == "running", Job.worker == worker).order_by(Job.started_at.desc()))


def on_child_lost(s: Session, worker: str, *, max_attempts: int, why: str) -> tuple[str, str | None]:
    """The pool child `worker` died (decoder abort, segfault, OOM kill): requeue its job or fail it.
    Returns (verdict, job id): "requeued", "failed" or "ignored" (nothing of ours)."""
    job = running_on(s, worker)
    if job is None:
        return "ignored", None
    if job.attempts >= max_attempts:
        won = fail_running(
            s,
            job.id,
            attempts=job.attempts,
            worker=worker,
            code="worker_crashed",
            message=f"the worker process died while processing this slide ({why}), {job.attempts} time(s); giving up",
        )
        return ("failed" if won else "ignored"), job.id
    return ("requeued" if requeue_running(s, job.id, attempts=job.attempts, worker=worker) else "ignored"), job.id


def on_hard_timeout(s: Session, worker: str, limit_s: float) -> tuple[bool, str | None]:
    """The hard time limit killed the child: fail its job with the reason (no retry: it would hang again)."""
    job = running_on(s, worker)
    if job is None:
        return False, None
    won = fail_running(
        s,
        job.id,
        attempts=job.attempts,
        worker=worker,
        code="time_limit",
        message=f"the job exceeded its hard time limit of {limit_s:g} s and was stopped",
    )
    return won, job.id


@dataclass
class Reaped:
    """What `reap_stale` did: jobs to re-publish, and jobs it failed (their webhooks are due)."""

    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def reap_stale(s: Session, *, lease_s: float, max_attempts: int) -> Reaped:
    """Requeue `running` jobs silent for two leases, or fail them once out of attempts."""
    cutoff = stale_cutoff(2 * lease_s)
    silent = Job.heartbeat_at.is_(None) | (Job.heartbeat_at < cutoff)
    rows = s.execute(select(Job.id, Job.attempts).where(Job.state == "running", silent)).all()
    out = Reaped()
    for job_id, attempts in rows:
        if (attempts or 0) >= max_attempts:
            if fail_running(
                s,
                job_id,
                attempts=attempts,
                silent_since=cutoff,
                code="worker_lost",
                message=f"the worker stopped during this job {attempts} times; giving up",
            ):
                out.failed.append(job_id)
        elif requeue_running(s, job_id, attempts=attempts, cond=(silent,)):
            out.requeued.append(job_id)
    return out


def recover_orphans(s: Session, *, max_attempts: int, worker_prefix: str | None = None) -> dict[str, int]:
    """Jobs left `running` by a stopped embedded gateway go back to the queue (or end once out of attempts).

    The gateway's workers died with it (parent-death signal), so every running job it claimed is an orphan;
    `worker_prefix` limits this to the jobs this host's gateways claimed."""
    q = select(Job).where(Job.state == "running")
    if worker_prefix is not None:
        q = q.where(Job.worker.like(f"{worker_prefix}%"))
    out = {"requeued": 0, "failed": 0, "canceled": 0}
    for job in s.scalars(q).all():
        if job.cancel_requested:
            out["canceled"] += fail_running(
                s, job.id, attempts=job.attempts, code="canceled", message="canceled by request", state="canceled"
            )
        elif job.attempts >= max_attempts:
            out["failed"] += fail_running(
                s,
                job.id,
                attempts=job.attempts,
                code="worker_lost",
                message=f"the worker stopped during the job {job.attempts} times",
            )
        else:
            out["requeued"] += requeue_running(s, job.id, attempts=job.attempts)
    return out


# --- reads the runners need -----------------------------------------------------------------------------------


def count_by_state(s: Session) -> dict[str, int]:
    counts = dict.fromkeys(JOB_STATES, 0)
    for state, n in s.execute(select(Job.state, func.count()).group_by(Job.state)):
        counts[state] = int(n)
    return counts


def queue_stats(s: Session) -> dict[str, dict[str, float]]:
    """Per queue: queued jobs and the age in seconds of the oldest (for metrics and autoscaling)."""
    now = utcnow()
    waiting: dict[str, tuple[int, datetime | None]] = {}
    # grouped by the bare column: PostgreSQL refuses `GROUP BY coalesce(queue, :p)` against a select list whose
    # coalesce has a bind parameter of its own; a job from before queues were recorded (NULL) is interactive
    rows = s.execute(
        select(Job.queue, func.count(), func.min(Job.created_at)).where(Job.state == "queued").group_by(Job.queue)
    ).all()
    for q, n, oldest in rows:
        q = q or INTERACTIVE
        count, first = waiting.get(q, (0, None))
        oldest = _aware(oldest, now)
        waiting[q] = (count + int(n), min((t for t in (first, oldest) if t is not None), default=None))
    out = {q: {"depth": 0.0, "oldest_age_s": 0.0} for q in QUEUES}
    for q, (n, oldest) in waiting.items():
        if q in out:
            out[q] = {"depth": float(n), "oldest_age_s": max(0.0, (now - oldest).total_seconds()) if oldest else 0.0}
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
