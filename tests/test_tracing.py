"""One OpenTelemetry trace from the upload through the Celery queue to the pipeline stages, recorded with the SDK's
in-memory exporter: the gateway (FastAPI instrumentation) publishes over a real Redis, a Celery worker in this
process (Celery instrumentation, context from the message headers) runs the job, and the job row and
`GET /jobs/{id}` carry the trace id. In embedded mode the trace crosses into the spawned worker process through the
traceparent stored with the job, and that process exports over OTLP/HTTP to a receiver here."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient
from otlp_receiver import OtlpReceiver
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


def _upload_and_wait(client: TestClient, slide, *, deadline: float) -> dict:
    """Upload `slide` and poll its job until it ends (before `deadline`); the job view."""
    up = client.post("/slides", files={"file": ("s.svs", slide.read_bytes())}, headers={"X-API-Key": KEY})
    assert up.status_code == 202, up.text
    job_id = up.json()["job"]["id"]
    while (job := client.get(f"/jobs/{job_id}", headers={"X-API-Key": KEY}).json())["state"] not in (
        "succeeded",
        "failed",
    ):
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    return job


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
        job = _upload_and_wait(client, cmu_svs, deadline=time.monotonic() + 60)
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
    assert job_span.attributes["mstar.job_id"] == job["id"] and job_span.attributes["mstar.state"] == "succeeded"
    assert not any("s.svs" in str(v) for s in mine for v in (s.attributes or {}).values())  # no file names


def test_embedded_worker_process_continues_the_upload_trace(spans, monkeypatch, tmp_path, cmu_svs) -> None:
    """Embedded mode: the job runs in a spawned worker process that gets no message headers. Its `mstar.job` span
    (exported by that process over OTLP/HTTP to a receiver here) must be a child of the upload's request span
    (recorded in this process), in the same trace as `GET /jobs/{id}` reports."""
    from service.api import create_app
    from service.config import Settings

    settings = Settings(
        data_dir=tmp_path,
        pipeline="runner_pipelines:tiny",
        runner_workers=1,
        runner_poll_s=0.1,
        api_keys=[{"tenant": "lab", "key": KEY}],
    )
    with OtlpReceiver() as receiver:
        # read by the spawned worker's tracing.setup (this process already has its in-memory provider)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.url)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
        with TestClient(create_app(settings)) as client:
            deadline = time.monotonic() + 60
            job = _upload_and_wait(client, cmu_svs, deadline=deadline)
            while not any(s["name"] == "mstar.job" for s in receiver.spans):  # the worker's batch export
                assert time.monotonic() < deadline, receiver.spans
                time.sleep(0.1)
    assert job["state"] == "succeeded", job
    trace_id = job["trace_id"]
    upload = next(
        s
        for s in spans.get_finished_spans()
        if s.name == "POST /slides" and format(s.context.trace_id, "032x") == trace_id
    )
    worker = [s for s in receiver.spans if s["trace_id"] == trace_id]
    by_name = {s["name"]: s for s in worker}
    job_span = by_name["mstar.job"]
    assert job_span["service"] == "mstar-worker"  # recorded by the worker process, not this one
    gateway = {format(s.context.span_id, "016x"): s for s in spans.get_finished_spans()}
    chain, at = [], job_span["parent"]  # the job span's ancestors, all recorded by the gateway in this process
    while at:
        chain.append(gateway[at].name)
        at = format(gateway[at].parent.span_id, "016x") if gateway[at].parent else None
    assert chain[-1] == upload.name and format(gateway[job_span["parent"]].context.trace_id, "032x") == trace_id
    assert by_name["stage open"]["parent"] == job_span["span_id"] == by_name["stage embed"]["parent"]


def test_probes_and_scrapes_make_no_spans(spans, tmp_path, caplog) -> None:
    """Health probes and Prometheus scrapes (every few seconds from each kubelet and scraper) would drown the
    traces: the gateway's request spans leave them out, and setting tracing up logs no error."""
    import logging

    from service.api import create_app
    from service.config import Settings

    spans.clear()
    settings = Settings(data_dir=tmp_path, api_keys=[{"tenant": "ops", "key": KEY, "admin": True}])
    with caplog.at_level(logging.WARNING), TestClient(create_app(settings)) as client:
        for path in ("/healthz", "/readyz", "/metrics"):
            assert client.get(path, headers={"X-API-Key": KEY}).status_code == 200, path
        assert client.get("/jobs", headers={"X-API-Key": KEY}).status_code == 200
    names = {s.name for s in spans.get_finished_spans()}
    assert "GET /jobs" in names, names
    assert not {n for n in names if n.rsplit(" ", 1)[-1] in ("/healthz", "/readyz", "/metrics")}, names
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("opentelemetry")]


def test_a_job_span_stays_in_its_own_jobs_trace(spans) -> None:
    """A Celery token may run another job of its queue than the one whose upload published it: the job's span
    joins the trace stored with that job (its parent: the submitting span), linked to the task span that ran
    it; a token that ran its own job keeps the task span as the parent."""
    from opentelemetry import trace

    from service.obs import tracing

    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("POST /slides (job B)"):
        stored_b = tracing.current_traceparent()
        upload_b = trace.get_current_span().get_span_context()
    with tracer.start_as_current_span("run/task (token of job A)") as task:
        with tracing.span("mstar.job", parent=stored_b) as job_b:
            pass
        with tracing.span("mstar.job", parent=tracing.current_traceparent()) as job_a:
            pass
    b, a, task_ctx = job_b.get_span_context(), job_a.get_span_context(), task.get_span_context()
    assert b.trace_id == upload_b.trace_id != task_ctx.trace_id
    assert job_b.parent.span_id == upload_b.span_id
    assert [link.context.span_id for link in job_b.links] == [task_ctx.span_id]
    assert a.trace_id == task_ctx.trace_id and job_a.parent.span_id == task_ctx.span_id and not job_a.links


def test_disable_stops_request_spans_too(spans, tmp_path) -> None:
    """FastAPI makes request spans whenever a tracer provider is installed (it stays, once set); after
    `tracing.disable` it must make none. (Last in this module: it leaves tracing off.)"""
    from service.api import create_app
    from service.config import Settings
    from service.obs import tracing

    spans.clear()
    tracing.disable()
    settings = Settings(data_dir=tmp_path, api_keys=[{"tenant": "lab", "key": KEY}])
    with TestClient(create_app(settings)) as client:
        assert client.get("/jobs", headers={"X-API-Key": KEY}).status_code == 200
    assert not spans.get_finished_spans(), [s.name for s in spans.get_finished_spans()]
