"""Celery mode, the production path, observed as an operator would: `mstar serve` and `mstar worker` as real
processes on a real Redis and PostgreSQL, a real (tiny) exported model bundle run by onnxruntime, both processes
exporting traces over OTLP/HTTP to a receiver here.

- The gateway's /metrics (on PostgreSQL, which refused the queue query SQLite accepted): while no worker runs, an
  upload's job shows in its queue's depth and oldest-job age; once a worker has run it, the queue is empty again.
- The worker's `--metrics-port`: the pool child recorded the job's stage durations, its patches/s, its outcome and
  the model backend's latency per model (prometheus_client multiprocess mode), and the gateway did not (so a sum
  over all targets counts the job once).
- One trace: the upload (gateway process) -> the Celery publish -> the task (worker process) -> `mstar.job` -> the
  embed stage -> each patch encoder call, under the trace id `GET /jobs/{id}` returns.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import pytest
from otlp_receiver import OtlpReceiver
from prometheus_client.parser import text_string_to_metric_families
from services import free_port, fresh_database, mstar_serve, mstar_worker, postgres_url, redis_server  # noqa: F401

pytestmark = pytest.mark.services

KEY = "observe-celery-key-0123456789"


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _kind(span_name: str) -> str:
    """A Celery span's name without its task name (`run/service.worker.tasks.run` -> `run/`)."""
    return span_name.split("/", 1)[0] + "/" if span_name.startswith(("apply_async/", "run/")) else span_name


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    from inference_fixtures import build_tiny_bundle

    return build_tiny_bundle(tmp_path_factory.getbasetemp())


@pytest.fixture
def env(tmp_path: Path, bundle_dir: Path, postgres_url: str, redis_server) -> dict[str, str]:  # noqa: F811
    import redis

    broker = redis_server.url.rsplit("/", 1)[0] + "/7"  # a database of our own on the shared server
    redis.Redis.from_url(broker).flushdb()
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("MSTAR_", "OTEL_"))},
        "MSTAR_DATA_DIR": str(tmp_path / "data"),
        "MSTAR_DATABASE_URL": fresh_database(postgres_url, "mstar_observe"),
        "MSTAR_BROKER_URL": broker,
        "MSTAR_BUNDLE_DIR": str(bundle_dir),
        "MSTAR_API_KEYS": json.dumps([{"tenant": "lab", "key": KEY, "admin": True}]),  # admin: /metrics too
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }


def test_celery_mode_metrics_and_one_trace_through_real_processes(env, tmp_path: Path, bundle_dir: Path, cmu_svs):
    from service.inference.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    encoder, aggregator = bundle.patch_encoder.name, bundle.aggregator.name
    metrics_port = free_port()
    with OtlpReceiver() as receiver:
        env = {**env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.url}
        with mstar_serve(env, log=tmp_path / "gateway.log", timeout=120) as gateway:
            c = httpx.Client(base_url=gateway.url, headers={"X-API-Key": KEY}, timeout=60)
            up = c.post("/slides", files={"file": ("s.svs", cmu_svs.read_bytes())})
            assert up.status_code == 202, up.text
            job_id = up.json()["job"]["id"]
            time.sleep(1.5)  # no worker yet: the job waits on its queue
            waiting = _samples(c.get("/metrics").text)
            depth = {k[1][0][1]: v for k, v in waiting.items() if k[0] == "mstar_queue_depth"}
            age = {k[1][0][1]: v for k, v in waiting.items() if k[0] == "mstar_queue_oldest_age_seconds"}
            assert sorted(depth.values()) == [0, 1], depth  # one queue holds it, the other is empty
            (queue,) = [q for q, n in depth.items() if n == 1]
            assert 1.0 <= age[queue] < 60, age
            assert waiting[("mstar_jobs", (("state", "queued"),))] == 1

            worker_args = ["--metrics-port", str(metrics_port)]
            with mstar_worker(env, "obs", tmp_path / "worker.log", worker_args) as worker:
                deadline = time.monotonic() + 240
                while (job := c.get(f"/jobs/{job_id}").json())["state"] not in ("succeeded", "failed", "canceled"):
                    assert worker.poll() is None, (tmp_path / "worker.log").read_text(errors="replace")[-3000:]
                    assert time.monotonic() < deadline, job
                    time.sleep(0.3)
                assert job["state"] == "succeeded", job
                ok = ("mstar_jobs_finished_total", (("code", ""), ("state", "succeeded")))
                while (got := _samples(httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text)).get(ok) != 1:
                    assert time.monotonic() < deadline, {k: v for k, v in got.items() if k[0].startswith("mstar_")}
                    time.sleep(0.2)
                trace_id = job["trace_id"]
                # the task span ends (and is exported) after the job's: wait for every span of the chain
                wanted = {f"infer {encoder}", "stage embed", "mstar.job", "POST /slides", "apply_async/", "run/"}
                while not wanted <= {_kind(s["name"]) for s in receiver.spans if s["trace_id"] == trace_id}:
                    assert time.monotonic() < deadline, receiver.spans
                    time.sleep(0.2)
                after = _samples(c.get("/metrics").text)

    # the worker recorded the job: stages (embed among them), patches/s, outcome, backend latency per model
    stages = {dict(k[1])["stage"] for k, v in got.items() if k[0] == "mstar_job_stage_duration_seconds_count" and v}
    assert {"embed", "aggregate"} <= stages, stages
    assert got[("mstar_job_stage_duration_seconds_count", (("stage", "embed"),))] == 1
    assert got[("mstar_patches_per_second_count", ())] == 1 and got[("mstar_patches_per_second_sum", ())] > 0
    assert got[("mstar_backend_seconds_count", (("model", encoder),))] >= 1
    assert got[("mstar_backend_seconds_count", (("model", aggregator),))] >= 1
    assert got[("mstar_worker_jobs_running", ())] == 0
    # the gateway saw the queue empty again, and recorded no outcome of its own (Celery mode: the worker does)
    assert after[("mstar_queue_depth", (("queue", queue),))] == 0
    assert after[("mstar_jobs", (("state", "succeeded"),))] == 1
    assert after.get(("mstar_patches_per_second_count", ()), 0) == 0
    assert after.get(ok, 0) == 0

    # one trace: gateway request -> publish -> task -> job -> embed stage -> encoder calls
    assert trace_id and len(trace_id) == 32
    spans = [s for s in receiver.spans if s["trace_id"] == trace_id]
    by_id = {s["span_id"]: s for s in spans}

    def one(name: str) -> dict:
        (s,) = [s for s in spans if s["name"] == name]
        return s

    upload, job_span, embed = one("POST /slides"), one("mstar.job"), one("stage embed")
    publish = next(s for s in spans if s["name"].startswith("apply_async/"))
    task = next(s for s in spans if s["name"].startswith("run/"))
    assert upload["service"] == publish["service"] == "mstar-gateway"
    assert task["service"] == job_span["service"] == embed["service"] == "mstar-worker"
    at = publish["parent"]  # the publish happens inside the upload request
    while at != upload["span_id"]:
        at = by_id[at]["parent"]
    assert task["parent"] == publish["span_id"] and job_span["parent"] == task["span_id"]
    assert embed["parent"] == job_span["span_id"]
    calls = [s for s in spans if s["name"] == f"infer {encoder}"]
    assert calls and all(s["parent"] == embed["span_id"] for s in calls)
    # probes and scrapes made no spans, and setting tracing up logged no error
    assert not [s for s in receiver.spans if s["name"].rsplit(" ", 1)[-1] in ("/readyz", "/metrics")]
    assert " ERROR opentelemetry" not in (tmp_path / "gateway.log").read_text(errors="replace")
