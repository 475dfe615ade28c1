"""Prometheus metrics of `mstar worker` (Celery mode), in prometheus_client's multiprocess mode.

Each pool child runs jobs and records their outcomes (`service.obs.job_metrics`: the same names the gateway uses in
embedded mode) into files of its own under `PROMETHEUS_MULTIPROC_DIR`; the master serves the sum over all of them
on `--metrics-port`. The folder is emptied at each worker start (stale files would add a previous run's counts),
and a child that died is marked dead so its live gauge (`mstar_worker_jobs_running`) stops counting.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

ENV = "PROMETHEUS_MULTIPROC_DIR"

_metrics: dict[str, Any] = {}


def enable(directory: Path) -> None:
    """Before the pool forks: an empty folder, and prometheus_client switched to multiprocess values (it picks its
    value class from the environment when first imported, which may already have happened)."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    os.environ[ENV] = str(directory)
    from prometheus_client import values

    values.ValueClass = values.get_value_class()


def enabled() -> bool:
    return bool(os.environ.get(ENV))


def serve(port: int, addr: str = "0.0.0.0") -> None:
    """Serve the aggregate of every process's files (a thread of the master)."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    start_http_server(port, addr=addr, registry=registry)


def _get() -> dict[str, Any]:
    if not _metrics:
        from prometheus_client import Gauge

        from service.obs.job_metrics import JobMetrics

        _metrics["jobs"] = JobMetrics(None)
        _metrics["running"] = Gauge(
            "mstar_worker_jobs_running", "Jobs executing now in live worker processes", multiprocess_mode="livesum"
        )
    return _metrics


def job_started() -> None:
    if enabled():
        _get()["running"].inc()


def job_ended(outcome: Any | None) -> None:
    """After `execute_job` (`outcome` None: it raised, and nothing is counted but the running gauge)."""
    if not enabled():
        return
    m = _get()
    m["running"].dec()
    if outcome is not None:
        m["jobs"].observe(outcome)


def verdict(state: str, code: str) -> None:
    """A verdict the pool master wrote for a child that could not (it died, or hit the hard time limit)."""
    if enabled():
        _get()["jobs"].jobs_finished.labels(state, code).inc()


def process_dead(pid: int | None) -> None:
    """Drop a dead child's live gauge values (its counters stay: they were real work)."""
    if enabled() and pid:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
