"""`CeleryQueue`: the gateway's `JobQueue` when a broker is configured (`service.runner.make_queue`).

`notify` publishes the job id to the `interactive` queue (uploads, PACS) or the `batch` queue. The job row was
committed before, so a lost publish is repaired by `republish_queued` (run at start; `mstar submit` re-publishes
its batch's queued jobs), and a sweep thread requeues running jobs whose lease expired long ago
(`jobs.reap_stale`): a duplicate message is harmless because workers claim the row conditionally.
"""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy import select

from service.config import Settings
from service.store.db import init_db, make_engine, session_factory, transaction
from service.store.models import Job
from service.worker import jobs
from service.worker.celery_app import BATCH, INTERACTIVE, PRIORITY, TASK_NAME, make_celery

log = logging.getLogger("mstar.queue")


class CeleryQueue:
    def __init__(self, settings: Settings, *, default_queue: str = INTERACTIVE) -> None:
        if default_queue not in (INTERACTIVE, BATCH):
            raise ValueError(f"unknown queue {default_queue!r}")
        self.settings = settings
        self.default_queue = default_queue
        self.app = make_celery(settings, with_tasks=False)
        self._engine = None
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None
        self._health_at = 0.0
        self._health: dict = {"ok": False, "kind": "celery"}

    def start(self) -> None:
        """Re-publish jobs still `queued` (a crash between commit and publish loses nothing)."""
        self._engine = make_engine(self.settings.db_url)
        init_db(self._engine)
        factory = session_factory(self._engine)
        n = self.republish_queued(factory)
        if n:
            log.info("re-published %d queued job(s)", n)
        self._stop.clear()
        self._reaper = threading.Thread(target=self._reap_loop, args=(factory,), name="mstar-reaper", daemon=True)
        self._reaper.start()

    def stop(self) -> None:
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join(5)
        if self._engine is not None:
            self._engine.dispose()
        self.app.close()

    def notify(self, job_id: str, *, queue: str | None = None) -> None:
        queue = queue or self.default_queue
        self.app.send_task(TASK_NAME, args=[job_id], queue=queue, routing_key=queue, priority=PRIORITY[queue])

    def republish_queued(self, factory, *, job_ids: list[str] | None = None) -> int:
        """Publish queued jobs again, batch jobs (options carry `batch_id`) on the batch queue."""
        with transaction(factory) as s:
            q = select(Job.id, Job.options).where(Job.state == "queued").order_by(Job.created_at)
            if job_ids is not None:
                q = q.where(Job.id.in_(job_ids))
            rows = s.execute(q).all()
        for job_id, options in rows:
            self.notify(job_id, queue=BATCH if (options or {}).get("batch_id") else None)
        return len(rows)

    def _reap_loop(self, factory) -> None:
        """Jobs whose worker vanished with no message left to redeliver them: requeue and re-publish."""
        while not self._stop.wait(self.settings.worker_lease_s):
            try:
                with transaction(factory) as s:
                    ids = jobs.reap_stale(
                        s, lease_s=self.settings.worker_lease_s, max_attempts=self.settings.job_max_attempts
                    )
                if ids:
                    log.warning("re-published %d job(s) whose worker stopped answering", len(ids))
                    self.republish_queued(factory, job_ids=ids)
            except Exception:  # broker or database down for a moment: try again next period
                log.warning("stale-job sweep failed", exc_info=True)

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
