"""The metrics of finished jobs, one definition for every mode: the gateway's registry records them in embedded
mode (the outcome comes back from its worker processes), each Celery pool child records them in prometheus_client's
multiprocess mode (`service.obs.worker_metrics`), and both expose the same names."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 1800)
BACKEND_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
PATCH_RATE_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)


class JobMetrics:
    """Stage durations, embedding throughput, outcomes and model backend latency, from `JobOutcome`s."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        r = registry
        self.stage_seconds = Histogram(
            "mstar_job_stage_duration_seconds", "Pipeline stage durations", ["stage"], buckets=STAGE_BUCKETS, registry=r
        )
        self.patches_per_second = Histogram(
            "mstar_patches_per_second", "Embedding throughput per job", buckets=PATCH_RATE_BUCKETS, registry=r
        )
        self.jobs_finished = Counter(
            "mstar_jobs_finished", "Jobs finished by state and error code", ["state", "code"], registry=r
        )
        self.backend_seconds = Histogram(
            "mstar_backend_seconds",
            "Model backend call latency (one call = one batch), per model",
            ["model"],
            buckets=BACKEND_BUCKETS,
            registry=r,
        )

    def observe(self, outcome: Any) -> None:
        """Record one execution's outcome. A lost attempt recorded nothing in the store and counts as "lost"."""
        self.jobs_finished.labels(outcome.state, outcome.error_code or "").inc()
        for stage, seconds in outcome.stage_seconds.items():
            self.stage_seconds.labels(stage).observe(float(seconds))
        embed = outcome.stage_seconds.get("embed")
        if outcome.n_patches and embed:
            self.patches_per_second.observe(outcome.n_patches / max(embed, 1e-6))
        for model, calls in (getattr(outcome, "backend_seconds", None) or {}).items():
            hist = self.backend_seconds.labels(model)
            for seconds in calls:
                hist.observe(seconds)
