"""End to end over real HTTP with everything real: uvicorn on loopback, job records in a real PostgreSQL server,
the embedded runner's worker processes, `service.pipeline.run_analysis` with a tiny exported model bundle,
and the real CMU slide. Then a restart: the records (and results) are still there.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import h5py
import httpx
import numpy as np
import pytest
from PIL import Image
from services import live_server, postgres_url  # noqa: F401  (session fixture: a real PostgreSQL server)

from service.api import create_app
from service.config import Settings

KEY = "e2e-tenant-key-0123456789abcdef"


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    from inference_fixtures import build_tiny_bundle

    return build_tiny_bundle(tmp_path_factory.getbasetemp())


def test_upload_poll_and_fetch_everything(tmp_path: Path, request, bundle_dir: Path, cmu_svs: Path) -> None:
    pg_url = request.getfixturevalue("postgres_url")
    settings = Settings(
        data_dir=tmp_path,
        database_url=pg_url,
        bundle_dir=bundle_dir,
        runner_workers=1,
        runner_poll_s=0.2,
        metrics_public=True,
        api_keys=[{"tenant": "e2e", "key": KEY}],
    )
    headers = {"Authorization": f"Bearer {KEY}"}
    with live_server(create_app(settings)) as url, httpx.Client(base_url=url, headers=headers, timeout=60) as c:
        ready = c.get("/readyz").json()
        assert ready["status"] == "ok" and ready["checks"]["backend"]["bundle"] == "tiny"
        models = c.get("/models").json()
        assert models["bundle"] == "tiny" and models["demo"] is True
        assert {m["role"] for m in models["models"]} >= {"patch_encoder", "aggregator"}
        labels = next(m["labels"] for m in models["models"] if m["role"] == "classifier")

        r = c.post("/slides", files={"file": ("CMU-1-Small-Region.svs", cmu_svs.read_bytes())})
        assert r.status_code == 202, r.text
        job_url = r.headers["location"]
        seen_running = False
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            job = c.get(job_url).json()
            seen_running |= job["state"] == "running"
            if job["state"] in ("succeeded", "failed", "canceled"):
                break
            time.sleep(0.2)
        assert job["state"] == "succeeded", job
        assert job["progress"] == 1.0 and job["attempts"] == 1 and job["stage_seconds"].get("embed", 0) > 0

        result = c.get(f"{job_url}/result").json()
        assert result["status"] == "analyzed" and result["bundle"]["name"] == "tiny"
        assert result["slide"]["mpp"]["x"] == pytest.approx(0.499)
        n = result["tiling"]["patches"]
        assert n > 0 and len(result["embedding"]["values"]) == result["embedding"]["dim"]
        feats = c.get(f"{job_url}/features")
        assert feats.status_code == 200
        with h5py.File(io.BytesIO(feats.content), "r") as f:
            assert f["features"].shape[0] == f["coords"].shape[0] == n
            assert np.isfinite(f["features"][:]).all()
        png = c.get(f"{job_url}/heatmap.png")
        assert png.status_code == 200
        assert Image.open(io.BytesIO(png.content)).format == "PNG"
        assert all(lab in str(result["classification"]) for lab in labels)  # per-head probabilities, labelled
        assert "survival" in result and "report" in result

        metrics = c.get("/metrics").text
        assert 'mstar_job_stage_duration_seconds_count{stage="embed"} 1.0' in metrics
        assert "mstar_patches_per_second_count 1.0" in metrics

        slide_id = r.json()["slide"]["id"]
        job_id = job["id"]

    # A restart against the same PostgreSQL database and data dir: nothing is lost.
    with live_server(create_app(settings)) as url, httpx.Client(base_url=url, headers=headers, timeout=60) as c:
        assert c.get(f"/jobs/{job_id}").json()["state"] == "succeeded"
        assert c.get(f"/jobs/{job_id}/result").json()["tiling"]["patches"] == n
        assert c.get(f"/slides/{slide_id}").status_code == 200
