"""The Triton path against a real `tritonserver` (the binary in the nvidia-pytriton wheel, Python backend).

Outputs through Triton (gRPC and HTTP) equal the in-process onnxruntime backend's; concurrent requests are
dynamically batched (server statistics and /metrics); the launcher bounds a hanging start-up and cleans up.
"""

from __future__ import annotations

import glob
import re
import time
from pathlib import Path

import numpy as np
import pytest
from inference_fixtures import PATCH, build_tiny_bundle, real_patches
from triton_launcher import TritonServer

from service.errors import BackendUnavailableError, InvalidParameterError
from service.inference.bundle import load_bundle
from service.inference.ort_backend import OrtBackend
from service.inference.triton_backend import TritonBackend

pytest.importorskip("pytriton")
pytest.importorskip("tritonclient.grpc")

pytestmark = pytest.mark.services


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return load_bundle(build_tiny_bundle(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="module")
def server(bundle):
    srv = TritonServer(bundle.root, startup_timeout_s=120)
    srv.start()
    yield srv
    rc = srv.stop()
    assert rc == 0, f"tritonserver exit code {rc}"
    assert not glob.glob(f"/dev/shm/{srv.shm_prefix}*")


@pytest.fixture(scope="module")
def local(bundle):
    with OrtBackend(bundle, device="cpu") as b:
        yield b


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_triton_equals_onnxruntime(server: TritonServer, bundle, local: OrtBackend, protocol: str) -> None:
    url = server.grpc_url if protocol == "grpc" else server.http_url
    with TritonBackend(bundle, url, protocol=protocol, parallel=4) as tb:
        h = tb.health()
        assert h["ok"], h
        px = real_patches(10)
        got = tb.embed_patches(px)
        assert got.dtype == np.float32 and got.shape == (10, 96)
        np.testing.assert_allclose(got, local.embed_patches(px), atol=1e-6)
        feats = np.random.default_rng(3).standard_normal((77, 96)).astype(np.float32)
        a, b = tb.aggregate(feats), local.aggregate(feats)
        for k in ("embedding", "attention", "tokens"):
            np.testing.assert_allclose(a[k], b[k], atol=1e-6)
        th, lh = tb.run_heads(feats), local.run_heads(feats)
        assert th["subtype"]["label"] == lh["subtype"]["label"]
        assert th["subtype"]["probabilities"] == pytest.approx(lh["subtype"]["probabilities"], abs=1e-6)
        assert th["survival"]["survival"] == pytest.approx(lh["survival"]["survival"], abs=1e-6)


def test_report_and_zeroshot_through_triton(server: TritonServer, bundle, local: OrtBackend) -> None:
    from service.inference import report, zeroshot

    feats = np.random.default_rng(5).standard_normal((64, 96)).astype(np.float32)
    prompts = ["squamous cell carcinoma", "benign lung parenchyma"]
    with TritonBackend(bundle, server.grpc_url) as tb:
        assert report.generate_report(tb, feats) == report.generate_report(local, feats)
        a = zeroshot.score(bundle, tb, feats, None, prompts)
        b = zeroshot.score(bundle, local, feats, None, prompts)
    assert a["best"] == b["best"]
    assert [p["cosine"] for p in a["prompts"]] == pytest.approx([p["cosine"] for p in b["prompts"]], abs=1e-6)


def test_concurrent_requests_are_dynamically_batched(server: TritonServer, bundle, local: OrtBackend) -> None:
    # 48 one-patch requests, 16 in flight: the server should run them in far fewer executions
    with TritonBackend(bundle, server.grpc_url, parallel=16, max_chunk=1, priority=1) as tb:
        before = tb.statistics("mstar_patch_encoder")
        px = real_patches(48)
        got = tb.embed_patches(px)
        # the server counts a request after its response has gone out: read the statistics once all 48 are in
        deadline = time.monotonic() + 15
        while True:
            after = tb.statistics("mstar_patch_encoder")
            done = int(after["inference_stats"]["success"]["count"]) - int(
                before["inference_stats"]["success"]["count"]
            )
            if done >= 48 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    np.testing.assert_allclose(got, local.embed_patches(px), atol=1e-6)
    requests = int(after["inference_stats"]["success"]["count"]) - int(before["inference_stats"]["success"]["count"])
    executions = int(after["execution_count"]) - int(before["execution_count"])
    assert requests == 48
    assert executions < requests, (executions, requests)
    assert max(int(s["batch_size"]) for s in after["batch_stats"]) > 1
    metrics = server.metrics()
    exec_count = re.search(r'nv_inference_exec_count\{model="mstar_patch_encoder",version="1"\} (\d+)', metrics)
    req_count = re.search(r'nv_inference_request_success\{model="mstar_patch_encoder",version="1"\} (\d+)', metrics)
    assert exec_count and req_count and int(exec_count.group(1)) < int(req_count.group(1))


def test_client_side_refusals(server: TritonServer, bundle) -> None:
    with TritonBackend(bundle, server.grpc_url) as tb, pytest.raises(InvalidParameterError, match="expected uint8"):
        tb.embed_patches(np.zeros((1, PATCH, PATCH, 3), dtype=np.float32))
    with pytest.raises(BackendUnavailableError, match="unknown Triton protocol"):
        TritonBackend(bundle, server.grpc_url, protocol="smtp")


def test_unreachable_server_is_a_typed_error(bundle) -> None:
    from triton_launcher import free_port

    with TritonBackend(bundle, f"127.0.0.1:{free_port()}", timeout_s=5) as tb:
        assert tb.health()["ok"] is False
        with pytest.raises(BackendUnavailableError):
            tb.embed_patches(real_patches(1))
        with pytest.raises(BackendUnavailableError, match="not ready"):
            tb.wait_ready(timeout_s=1)


def test_launcher_bounds_a_hanging_start_and_cleans_up(bundle, tmp_path: Path) -> None:
    # Without the library path the Python stub cannot load its bundled libs and the server hangs in
    # "loading" (machine-notes §3b): the launcher must give up at its timeout, kill it and remove its shm.
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    srv = TritonServer(bundle.root, startup_timeout_s=8, env=env)
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailableError, match="tritonserver"):
        srv.start()
    assert time.monotonic() - t0 < 40
    assert not srv.running()
    assert not glob.glob(f"/dev/shm/{srv.shm_prefix}*")


def test_missing_repository_refused(tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailableError, match="does not exist"):
        TritonServer(tmp_path / "nope").start()


def test_chunks_in_flight_together_stay_in_the_callers_trace(server: TritonServer, bundle) -> None:
    """Triton's chunks of one batch run on the backend's thread pool; each model call's span must still be a child
    of the span that asked (the job's embed stage), not the root of a trace of its own."""
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from service.obs import tracing

    exporter = InMemorySpanExporter()
    assert tracing.setup("mstar-test", processor=SimpleSpanProcessor(exporter))
    try:
        with TritonBackend(bundle, server.grpc_url, parallel=4, max_chunk=2) as tb, tracing.span("stage embed") as st:
            tb.embed_patches(real_patches(10))
    finally:
        tracing.disable()
        exporter.shutdown()
    stage = st.get_span_context()
    calls = [s for s in exporter.get_finished_spans() if s.name == "infer mstar_patch_encoder"]
    assert len(calls) == 5  # 10 patches in chunks of 2
    assert [format(s.context.trace_id, "032x") for s in calls] == [format(stage.trace_id, "032x")] * 5
    assert all(s.parent is not None and s.parent.span_id == stage.span_id for s in calls)


def test_dashboard_triton_metrics_are_what_this_server_exports(server: TritonServer, bundle) -> None:
    """The dashboard's Triton panels read `nv_*` series by `model`: this server (CPU build, so no GPU series)
    exports each non-GPU one the dashboard names, labelled by model."""
    import json

    with TritonBackend(bundle, server.grpc_url) as tb:  # at least one request, so the counters have moved
        tb.embed_patches(real_patches(2))
    dash = (Path(__file__).resolve().parents[1] / "deploy/grafana/dashboards/mstar.json").read_text()
    exprs = [t["expr"] for p in json.loads(dash)["panels"] for t in p["targets"]]
    used = {n for e in exprs for n in re.findall(r"\b(nv_[a-z_]+)\b", e) if not n.startswith("nv_gpu_")}
    assert len(used) >= 4, used
    text = server.metrics()  # read as Prometheus stores it (a parser would rename counters to *_total)
    for name in used:
        assert re.search(rf'^{name}{{[^}}]*model="mstar_patch_encoder"', text, re.M), (name, text[:2000])
