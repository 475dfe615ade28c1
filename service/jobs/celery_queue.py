"""`CeleryQueue`: the gateway's `JobQueue` when a broker is configured (`service.jobs.make_queue`).

A message is a token: "run one job from this queue". The worker that receives it claims the next job fairly
across tenants (`lifecycle.claim_fair`), which is usually, but not always, the job it was published for. Every
queued job gets one token when it is created, so tokens and queued jobs stay in step; a spare token finds nothing
and is dropped.

`notify` publishes a token to the job's queue (`interactive` for uploads and PACS, `batch` for manifests) and
stamps the row's `published_at`. The job row is committed before the publish, so a crash in between leaves a `queued`
row that was never published: `start` re-publishes exactly those (`published_at IS NULL`), not every queued
job. A published message stays in Redis (AOF, `appendfsync always`) until its job ends, and a job requeued
after a crash is re-published by whoever requeued it, so nothing else needs re-publishing at start; `mstar
submit` re-publishes its batch's queued jobs on request. A sweep thread requeues running jobs whose lease
expired long ago (`lifecycle.reap_stale`) and sends the webhooks of jobs it fails, or that ended with no sender
(`lifecycle.unreported`): a duplicate message is harmless because workers claim the row conditionally.
"""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from service import webhooks
from service.config import Settings
from service.jobs import lifecycle, rna_channel
from service.jobs.celery_app import BATCH, INTERACTIVE, PRIORITY, TASK_NAME, make_celery
from service.jobs.resources import open_store
from service.store.db import transaction
from service.store.models import Job, utcnow

log = logging.getLogger("mstar.queue")

#: jobs that ended longer ago than this without a webhook sender are not reported any more
UNREPORTED_WINDOW_S = 3600.0


#: a broker that does not answer fails a publish within about the connection timeout, not kombu's default ~20 s
PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.25, "interval_max": 0.5}


def publish_token(app, job_id: str, queue: str) -> None:
    """One token for `queue`, naming `job_id` as the job it was published for."""
    app.send_task(
        TASK_NAME, args=[job_id], queue=queue, routing_key=queue, priority=PRIORITY[queue], retry_policy=PUBLISH_RETRY
    )


class CeleryQueue:
    def __init__(self, settings: Settings, *, default_queue: str = INTERACTIVE) -> None:
        if default_queue not in (INTERACTIVE, BATCH):
            raise ValueError(f"unknown queue {default_queue!r}")
        self.settings = settings
        self.default_queue = default_queue
        self.app = make_celery(settings)
        self._factory: sessionmaker[Session] | None = None
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None
        self._hooks: dict[int, webhooks.Deliveries] = {}  # per job store: off the sweep thread, fair between tenants
        self._health_at = 0.0
        self._health: dict = {"ok": False, "kind": "celery"}

    def _sessions(self) -> sessionmaker[Session]:
        """The job store (opened on first use: `mstar submit` publishes without `start`)."""
        if self._factory is None:
            self._factory = open_store(self.settings).sessions
        return self._factory

    def start(self) -> None:
        """Start the sweep, then publish jobs left `queued` and never published (a crash between commit and
        publish loses nothing); with the broker down they wait for the sweep instead of failing the start."""
        factory = self._sessions()
        self._stop.clear()
        self._reaper = threading.Thread(target=self._reap_loop, args=(factory,), name="mstar-reaper", daemon=True)
        self._reaper.start()
        n = self.republish_queued(factory, unpublished_only=True)
        if n:
            log.info("published %d queued job(s) that had never been published", n)

    def stop(self) -> None:
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join(5)
        for hooks in self._hooks.values():
            hooks.close()
        self.app.close()

    def notify(self, job_id: str, *, queue: str | None = None) -> None:
        """Publish a token for the job's queue (naming the job as a hint), then record that it was published.

        The job's row is committed before this. Where the broker does not answer and this process sweeps (a
        gateway), the job stays queued and unpublished and the next sweep publishes it: the submit is accepted
        (it was a 500 after ~20 s, with the job created all the same, so a client retrying without an
        idempotency key made a duplicate). Without a sweep here (`mstar submit`) the failure is raised."""
        if queue is None:
            with transaction(self._sessions()) as s:
                queue = s.scalar(select(Job.queue).where(Job.id == job_id)) or self.default_queue
        try:
            publish_token(self.app, job_id, queue)
        except Exception as exc:
            if self._reaper is None or not self._reaper.is_alive():
                raise
            log.warning(
                "broker unreachable (%s): job %s stays queued; the sweep publishes it when the broker answers",
                type(exc).__name__,
                job_id,
            )
            return
        try:
            with transaction(self._sessions()) as s:
                s.execute(
                    update(Job)
                    .where(Job.id == job_id)
                    .values(published_at=utcnow())
                    .execution_options(synchronize_session=False)
                )
        except Exception:  # published anyway; the next gateway start publishes it once more, harmlessly
            log.warning("could not record the publish of job %s", job_id, exc_info=True)

    def job_terminal(self, job_id: str) -> None:
        """A job the gateway itself made terminal (a cancel, a reused result): send its webhook off this thread."""
        self._deliveries(self._sessions()).submit(job_id)

    def _deliveries(self, factory: sessionmaker[Session]) -> webhooks.Deliveries:
        hooks = self._hooks.get(id(factory))
        if hooks is None:
            hooks = self._hooks[id(factory)] = webhooks.Deliveries(factory, self.settings)
        return hooks

    def republish_queued(self, factory, *, job_ids: list[str] | None = None, unpublished_only: bool = False) -> int:
        """Publish queued jobs (again), batch jobs (options carry `batch_id`) on the batch queue."""
        with transaction(factory) as s:
            q = select(Job.id, Job.queue).where(Job.state == "queued", Job.follows.is_(None)).order_by(Job.created_at)
            if job_ids is not None:
                q = q.where(Job.id.in_(job_ids))
            if unpublished_only:
                q = q.where(Job.published_at.is_(None))
            rows = s.execute(q).all()
        for job_id, queue in rows:
            self.notify(job_id, queue=BATCH if queue == BATCH else INTERACTIVE)
        return len(rows)

    def _reap_loop(self, factory) -> None:
        while not self._stop.wait(self.settings.worker_lease_s):
            self.sweep(factory)

    def sweep(self, factory) -> lifecycle.Reaped:
        """One pass: requeue and re-publish jobs whose worker vanished with no message left to redeliver them,
        fail those out of attempts, publish tokens for jobs that never had one (followers whose leader failed),
        and send the webhooks of jobs that ended without a sender."""
        reaped = lifecycle.Reaped()
        try:
            with transaction(factory) as s:
                reaped = lifecycle.reap_stale(
                    s, lease_s=self.settings.worker_lease_s, max_attempts=self.settings.job_max_attempts
                )
                lease = self.settings.worker_lease_s
                due = lifecycle.unreported(
                    s,
                    settled_s=lease,
                    window_s=max(UNREPORTED_WINDOW_S, 10 * lease),
                    reclaim_after_s=webhooks.claim_lease_s(self.settings),
                )
            if reaped.requeued:
                log.warning("re-published %d job(s) whose worker stopped answering", len(reaped.requeued))
                self.republish_queued(factory, job_ids=reaped.requeued)
            self.republish_queued(factory, unpublished_only=True)
            for job_id in dict.fromkeys([*reaped.failed, *due]):  # the claim inside decides who sends: once
                self._deliveries(factory).submit(job_id)
            rna_channel.sweep(factory, open_store(self.settings).blobs, ttl_s=self.settings.rna_ttl_s)
        except Exception:  # broker or database down for a moment: try again next period
            log.warning("stale-job sweep failed", exc_info=True)
        return reaped

    def health(self) -> dict:
        """Broker reachable (cached 5 s, so /readyz does not open a connection per probe)."""
        now = time.monotonic()
        if now - self._health_at > 5.0:
            try:
                with self.app.connection_for_write() as conn:
                    conn.ensure_connection(max_retries=1, timeout=2)
                    conn.default_channel.client.ping()
                self._health = {"ok": True, "kind": "celery"}
            except Exception as err:  # any broker failure means not ready
                self._health = {"ok": False, "kind": "celery", "error": type(err).__name__}
            self._health_at = now
        return dict(self._health)
