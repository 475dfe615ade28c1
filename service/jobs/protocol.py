"""What the gateway needs from a job runner (the embedded pool, or the Celery publisher)."""

from __future__ import annotations

from typing import Protocol


class JobQueue(Protocol):
    """What the gateway needs from a job runner: the embedded pool, or the Celery publisher."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def notify(self, job_id: str) -> None:
        """A job was queued (embedded: wake the dispatcher; Celery: publish a token for its queue)."""

    def health(self) -> dict:
        """`{"ok": bool, ...}`, checked for real by /readyz."""
