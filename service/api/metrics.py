"""Prometheus metrics. One registry per app (tests build many apps in one process).

Request latency is labelled by the route *template* (`/jobs/{job_id}`), never the raw path, so ids do not
explode the label space. Job counts and queue depth are read from the store at scrape time, so they are right
whichever process changed a job. Stage durations, patches/s and backend latency come from finished jobs.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from starlette.types import ASGIApp, Receive, Scope, Send

_LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 1800)


class _StoreCollector:
    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self._counts = counts

    def collect(self):
        try:
            counts = self._counts()
        except Exception:  # store down: /readyz says so; a scrape must still succeed
            return
        jobs = GaugeMetricFamily("mstar_jobs", "Jobs by state", labels=["state"])
        for state, n in counts.items():
            jobs.add_metric([state], n)
        yield jobs
        yield GaugeMetricFamily("mstar_queue_depth", "Jobs waiting for a worker", value=counts.get("queued", 0))


class Metrics:
    def __init__(self, job_counts: Callable[[], dict[str, int]]) -> None:
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
        self.stage_seconds = Histogram(
            "mstar_job_stage_duration_seconds",
            "Pipeline stage durations",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.patches_per_second = Histogram(
            "mstar_patches_per_second",
            "Embedding throughput per job",
            buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000),
            registry=r,
        )
        self.backend_seconds = Histogram(
            "mstar_backend_check_duration_seconds",
            "Latency of the model backend check",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.jobs_finished = Counter(
            "mstar_jobs_finished", "Jobs finished by state and error code", ["state", "code"], registry=r
        )
        r.register(_StoreCollector(job_counts))

    def observe_outcome(self, outcome) -> None:
        self.jobs_finished.labels(outcome.state, outcome.error_code or "").inc()
        for stage, seconds in outcome.stage_seconds.items():
            self.stage_seconds.labels(stage).observe(float(seconds))
        embed = outcome.stage_seconds.get("embed")
        if outcome.n_patches and embed:
            self.patches_per_second.observe(outcome.n_patches / max(embed, 1e-6))

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
