"""`make_queue(settings)`: the runner a gateway uses, embedded unless a broker is configured."""

from __future__ import annotations

from typing import Any

from service.config import Settings
from service.jobs.protocol import JobQueue


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
