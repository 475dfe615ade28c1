"""Prometheus metrics. One registry per app (tests build many apps in one process).

Request latency is labelled by the route *template* (`/jobs/{job_id}`), never the raw path, so ids do not
explode the label space. Job counts and per-queue depth and oldest-job age are read from the store at scrape time,
so they are right whichever process changed a job. Stage durations, patches/s, outcomes and backend latency per
model come from finished jobs (`service.obs.job_metrics`): here in embedded mode; in Celery mode the workers
record and expose them (`mstar worker --metrics-port`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from starlette.types import ASGIApp, Receive, Scope, Send

from service.obs.job_metrics import JobMetrics

log = logging.getLogger("mstar.api")

_LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _StoreCollector:
    def __init__(self, counts: Callable[[], tuple[dict[str, int], dict[str, dict[str, float]]]]) -> None:
        self._counts = counts

    def collect(self):
        try:
            counts, queues = self._counts()
        except Exception as err:  # store down: /readyz says so; a scrape must still succeed, and say why it is short
            log.warning("/metrics without job counts and queue gauges: %s: %s", type(err).__name__, err)
            return
        jobs = GaugeMetricFamily("mstar_jobs", "Jobs by state", labels=["state"])
        for state, n in counts.items():
            jobs.add_metric([state], n)
        yield jobs
        depth = GaugeMetricFamily("mstar_queue_depth", "Jobs waiting for a worker, per queue", labels=["queue"])
        age = GaugeMetricFamily(
            "mstar_queue_oldest_age_seconds", "Age of the oldest waiting job, per queue (0 = none)", labels=["queue"]
        )
        for queue, stats in queues.items():
            depth.add_metric([queue], stats["depth"])
            age.add_metric([queue], stats["oldest_age_s"])
        yield depth
        yield age


class Metrics:
    def __init__(self, job_counts: Callable[[], tuple[dict[str, int], dict[str, dict[str, float]]]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_seconds = Histogram(
            "mstar_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upload_bytes = Counter("mstar_upload_bytes", "Bytes received in slide uploads", registry=r)
        self.uploads = Counter("mstar_uploads", "Slide uploads by outcome", ["outcome"], registry=r)
        self.backend_seconds = Histogram(
            "mstar_backend_check_duration_seconds",
            "Latency of the model backend check",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.jobs = JobMetrics(r)  # embedded mode: outcomes come back from the runner's worker processes
        r.register(_StoreCollector(job_counts))

    def observe_outcome(self, outcome) -> None:
        self.jobs.observe(outcome)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Pure ASGI middleware (no body buffering, so streaming uploads stay streaming)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def _send(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, _send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.request_seconds.labels(scope.get("method", ""), template, str(status["code"])).observe(
                time.perf_counter() - start
            )
