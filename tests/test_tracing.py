"""One OpenTelemetry trace from the upload through the Celery queue to the pipeline stages, recorded with the SDK's
in-memory exporter: the gateway (FastAPI instrumentation) publishes over a real Redis, a Celery worker in this
process (Celery instrumentation, context from the message headers) runs the job, and the job row and
`GET /jobs/{id}` carry the trace id."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient
from services import redis_server  # noqa: F401  (session fixture: a real Redis)

pytestmark = pytest.mark.services

KEY = "trace-key-0123456789abcdef"


@pytest.fixture(scope="module")
def spans():
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from service.obs import tracing

    exporter = InMemorySpanExporter()
    assert tracing.setup("mstar-test", processor=SimpleSpanProcessor(exporter))
    tracing.instrument_celery()
    yield exporter
    tracing.disable()  # later tests in this process build apps without tracing
    exporter.clear()


def test_one_trace_spans_gateway_queue_worker_and_stages(spans, redis_server, tmp_path, cmu_svs) -> None:  # noqa: F811
    import redis
    from celery.contrib.testing.worker import start_worker

    from service.api import create_app
    from service.config import Settings
    from service.jobs.celery_queue import CeleryQueue
    from service.worker.tasks import worker_app as make_worker_app

    redis.Redis.from_url(redis_server.url).flushdb()
    settings = Settings(
        data_dir=tmp_path,
        broker_url=redis_server.url,
        pipeline="runner_pipelines:tiny",
        api_keys=[{"tenant": "lab", "key": KEY}],
    )
    worker_app = make_worker_app(settings)
    with (
        TestClient(create_app(settings, queue=CeleryQueue(settings))) as client,
        start_worker(worker_app, pool="solo", perform_ping_check=False, queues=["interactive", "batch"]),
    ):
        up = client.post("/slides", files={"file": ("s.svs", cmu_svs.read_bytes())}, headers={"X-API-Key": KEY})
        assert up.status_code == 202, up.text
        job_id = up.json()["job"]["id"]
        deadline = time.monotonic() + 60
        while (job := client.get(f"/jobs/{job_id}", headers={"X-API-Key": KEY}).json())["state"] not in (
            "succeeded",
            "failed",
        ):
            assert time.monotonic() < deadline, job
            time.sleep(0.2)
    assert job["state"] == "succeeded", job
    trace_id = job["trace_id"]
    assert trace_id and len(trace_id) == 32

    mine = [s for s in spans.get_finished_spans() if format(s.context.trace_id, "032x") == trace_id]
    by_name = {s.name: s for s in mine}
    assert "POST /slides" in by_name  # the gateway's request
    publish = next(s for s in mine if s.name.startswith("apply_async/"))
    run = next(s for s in mine if s.name.startswith("run/"))
    job_span, stage_open, stage_embed = by_name["mstar.job"], by_name["stage open"], by_name["stage embed"]
    assert run.parent.span_id == publish.context.span_id  # the worker continued the publisher's context
    assert job_span.parent.span_id == run.context.span_id
    assert stage_open.parent.span_id == job_span.context.span_id == stage_embed.parent.span_id
    assert job_span.attributes["mstar.job_id"] == job_id and job_span.attributes["mstar.state"] == "succeeded"
    assert not any("s.svs" in str(v) for s in mine for v in (s.attributes or {}).values())  # no file names
