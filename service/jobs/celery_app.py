"""The Celery app, built from `Settings` so the gateway, `mstar submit` and every worker agree on one config.

Reliability settings and why (see docs/workers.md):

* `task_acks_late` + `task_reject_on_worker_lost`: a job's message is acked only after the job row reached a
  terminal state; a dead pool child puts it back in the queue.
* `worker_prefetch_multiplier=1`: a worker holds one unacked job per child, so nothing waits behind a long slide
  and the visibility clock (which starts at delivery) only ever runs for a job that is executing.
* `visibility_timeout` above the hard time limit: a message is redelivered only when its worker is gone, never
  while the job still runs. kombu's unacked-restore sweep (`unacked_restore_interval` x
  `unacked_restore_throttle`, default 10 x 10 s) is tightened so a lost job comes back soon after that.
* `unacked_mutex_expire`: the sweep's Redis lock; a worker killed while holding it blocks sweeps until expiry
  (kombu's default is 300 s), so keep it short.
* Two queues, `interactive` then `batch`; with `queue_order_strategy=priority` kombu's BRPOP lists them in that
  order, and interactive jobs also carry a higher Redis priority step (0 = first).
* No result backend: the job row in the database is the truth, not Celery's task state.
"""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

from service.config import Settings, time_limits
from service.errors import InvalidParameterError

TASK_NAME = "mstar.run_job"
INTERACTIVE, BATCH = "interactive", "batch"
QUEUES = (INTERACTIVE, BATCH)
#: Redis priority per queue (kombu maps 0..9 onto `priority_steps`; lower is served first).
PRIORITY = {INTERACTIVE: 0, BATCH: 6}
PRIORITY_STEPS = [0, 3, 6, 9]


def limits(settings: Settings) -> tuple[float, float, float]:
    """(soft, hard, visibility) seconds, checked: soft < hard < visibility."""
    soft, hard = time_limits(settings)
    visibility = float(settings.broker_visibility_timeout_s or hard * 1.1 + 60)
    if not visibility > hard:
        raise InvalidParameterError(
            f"broker_visibility_timeout_s ({visibility:g}) must exceed task_time_limit_s ({hard:g}), "
            "or running jobs are delivered a second time"
        )
    return soft, hard, visibility


def transport_options(settings: Settings) -> dict:
    _, _, visibility = limits(settings)
    interval = max(1, round(settings.broker_restore_interval_s))
    return {
        "visibility_timeout": int(visibility + 0.999),
        "unacked_restore_interval": interval,
        "unacked_restore_throttle": 1,  # every interval scans (kombu default: every 10th)
        "unacked_mutex_expire": max(10, 3 * interval),
        "queue_order_strategy": "priority",
        "priority_steps": PRIORITY_STEPS,
        "sep": ":",
        "socket_connect_timeout": 5,
        "socket_timeout": 30,
        "health_check_interval": 10,
    }


def make_celery(settings: Settings) -> Celery:
    """A Celery app for `settings.broker_url`. Producers only send by name; workers attach the task with
    `service.worker.tasks.worker_app`."""
    if not settings.broker_url:
        raise InvalidParameterError("no broker configured: set MSTAR_BROKER_URL (e.g. redis://host:6379/0)")
    soft, hard, _ = limits(settings)
    app = Celery("mstar", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure=True,  # a failed job is final in the database; the message is done too
        task_acks_on_timeout=True,  # a hard time limit fails the job (no retry: it would hang again)
        worker_prefetch_multiplier=1,
        task_time_limit=hard,
        task_soft_time_limit=soft,
        worker_max_memory_per_child=(settings.worker_max_memory_mb * 1024) or None,
        task_ignore_result=True,
        result_backend=None,
        task_track_started=False,
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options=transport_options(settings),
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 10, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 3},
        task_queues=[Queue(q, Exchange(q, type="direct"), routing_key=q) for q in QUEUES],
        task_default_queue=BATCH,
        task_default_priority=PRIORITY[BATCH],
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        worker_enable_remote_control=True,
        broker_heartbeat=0,
    )
    app.mstar_settings = settings  # type: ignore[attr-defined]
    return app
