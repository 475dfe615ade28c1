"""One job lifecycle: every change of a job row (`lifecycle`), running one job (`execute`), the embedded process
pool (`embedded`) and the Celery publisher (`celery_queue`). The Celery task (`service.worker.tasks`) only calls
these."""

from __future__ import annotations

from typing import Any, Protocol

from service.config import Settings


class JobQueue(Protocol):
    """What the gateway needs from a job runner: the embedded pool, or the Celery publisher."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def notify(self, job_id: str) -> None:
        """A job was queued (embedded: wake the dispatcher; Celery: publish a token for its queue)."""

    def health(self) -> dict:
        """`{"ok": bool, ...}`, checked for real by /readyz."""


def make_queue(settings: Settings, **kwargs: Any) -> JobQueue:
    """The runner for these settings: embedded unless a broker is configured."""
    if settings.broker_url:
        try:
            from service.jobs.celery_queue import CeleryQueue
        except ImportError as err:
            raise RuntimeError("MSTAR_BROKER_URL is set but the Celery queue is not available") from err
        return CeleryQueue(settings)
    from service.jobs.embedded import EmbeddedRunner

    return EmbeddedRunner(settings, **kwargs)
