"""Gateway metrics read from the store at scrape time (per-queue depth and oldest-job age) and model backend latency
per model, recorded by the backend's timing hook and the shared job metrics."""

from __future__ import annotations

from datetime import timedelta

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from services import fresh_database, postgres_url  # noqa: F401  (postgres_url: the session fixture)
from sqlalchemy import update

from service.api.context import ServiceContext
from service.config import Settings
from service.jobs import lifecycle
from service.jobs.execute import JobOutcome
from service.obs.job_metrics import JobMetrics
from service.store import repo
from service.store.db import transaction
from service.store.models import Job, Slide, new_id, utcnow


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _queued(factory, queue: str | None, age_s: float) -> str:
    with transaction(factory) as s:
        tenant = repo.ensure_tenant(s, "lab")
        slide = Slide(
            id=new_id(), tenant_id=tenant.id, sha256=new_id() * 2, format="svs", size_bytes=1, blob_key="k", info={}
        )
        s.add(slide)
        s.flush()
        job, _ = lifecycle.create(s, tenant_id=tenant.id, slide_id=slide.id, options={})
        old = utcnow() - timedelta(seconds=age_s)
        s.execute(update(Job).where(Job.id == job.id).values(created_at=old, queue=queue))
        return job.id


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    pg = request.getfixturevalue("postgres_url")
    return fresh_database(pg, "mstar_metrics_modes")


def test_queue_depth_and_oldest_age_per_queue_at_scrape_time(tmp_path, database_url) -> None:
    """On both databases the service runs on (PostgreSQL refused the grouped query SQLite accepted, and the scrape
    then carried neither the queue gauges nor the job counts)."""
    ctx = ServiceContext(Settings(data_dir=tmp_path, database_url=database_url))  # not started: nothing claims
    before = samples(ctx.metrics.render()[0].decode())
    assert before[("mstar_queue_depth", (("queue", "interactive"),))] == 0
    assert before[("mstar_queue_oldest_age_seconds", (("queue", "batch"),))] == 0
    _queued(ctx.sessions, "batch", 120)
    _queued(ctx.sessions, "batch", 30)
    _queued(ctx.sessions, "interactive", 5)
    _queued(ctx.sessions, None, 60)  # a job from before queues were recorded: interactive
    got = samples(ctx.metrics.render()[0].decode())
    assert got[("mstar_queue_depth", (("queue", "batch"),))] == 2
    assert got[("mstar_queue_depth", (("queue", "interactive"),))] == 2
    assert 119 <= got[("mstar_queue_oldest_age_seconds", (("queue", "batch"),))] < 180
    assert 59 <= got[("mstar_queue_oldest_age_seconds", (("queue", "interactive"),))] < 120
    assert got[("mstar_jobs", (("state", "queued"),))] == 4
    ctx.engine.dispose()


def test_backend_latency_per_model_from_outcomes() -> None:
    registry = CollectorRegistry()
    metrics = JobMetrics(registry)
    outcome = JobOutcome(
        "j", "succeeded", stage_seconds={"embed": 2.0}, n_patches=100, backend_seconds={"patch": [0.01, 0.02, 0.5]}
    )
    metrics.observe(outcome)
    from prometheus_client import generate_latest

    got = samples(generate_latest(registry).decode())
    assert got[("mstar_backend_seconds_count", (("model", "patch"),))] == 3
    assert abs(got[("mstar_backend_seconds_sum", (("model", "patch"),))] - 0.53) < 1e-9
    assert got[("mstar_patches_per_second_sum", ())] == 50
    assert got[("mstar_jobs_finished_total", (("code", ""), ("state", "succeeded")))] == 1
