"""Bring your own weights, end to end (docs/weights.md): a ViT-L checkpoint in the released mSTAR layout ->
`mstar extract` a cohort (official 128 µm field) -> `mstar train downstream` a head -> `mstar import-encoder
--head` -> `mstar analyze`, and the same bundle through `mstar serve` over HTTP (upload the real CMU slide, the
job succeeds, results present, equal to the CLI's). The ViT-L is randomly initialised (weights are never
downloaded); slow on a CPU, so the one bundle serves both."""

from __future__ import annotations

import csv
import io
import json
import os
import time
from pathlib import Path

import h5py
import httpx
import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from services import mstar_serve

KEY = "byow-tenant-key-0123456789abcdef"


@pytest.mark.slow
def test_released_checkpoint_to_served_bundle(tmp_path: Path, cmu_svs: Path) -> None:
    import timm

    from service.cli import main
    from training.data.synth import SynthConfig, generate_cohort

    torch.manual_seed(0)
    # the released layout: a plain state dict of timm's vit_large_patch16_224 as the official loader builds it
    vit = timm.create_model(
        "vit_large_patch16_224", pretrained=False, init_values=1e-5, num_classes=0, dynamic_img_size=True
    )
    ckpt = tmp_path / "mSTAR.pth"
    torch.save(vit.state_dict(), ckpt)
    del vit
    cohort = tmp_path / "cohort"
    generate_cohort(
        cohort,
        SynthConfig(cases=10, seed=3, size=512, workers=1, missing_report=0, missing_rna=0, two_slide_fraction=0),
    )
    run = CliRunner().invoke
    feats = tmp_path / "feats"
    res = run(main, ["extract", str(cohort / "cohort.csv"), "--encoder", str(ckpt), "--out", str(feats),
                     "--workers", "1", "--batch-size", "8"], catch_exceptions=False)  # fmt: skip
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output[res.output.index('{"slides"') :].splitlines()[0])  # after the progress bar
    # small slides: some hold no 128 µm patch with enough tissue, a recorded failure (failures.csv), not a crash
    assert summary["done"] >= 5 and summary["done"] + summary["failed"] == 10
    rows = list(csv.DictReader((cohort / "cohort.csv").open()))
    kept = [r for r in rows if (feats / f"{r['slide_id']}.h5").is_file()]
    with (cohort / "cohort.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(kept)
    first = kept[0]["slide_id"]
    with h5py.File(feats / f"{first}.h5") as f:
        assert f["features"].shape[1] == 1024
        assert f["coords"].attrs["field_um"] == pytest.approx(128.0)  # the official field, by default
        assert f["coords"].attrs["target_mpp"] == pytest.approx(128 / 224)

    cfg = tmp_path / "cls.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "task": "classification",
                "cohort": str(cohort / "cohort.csv"),
                "features_dir": str(feats),
                "label_column": "cancer_type",
                "aggregator": "abmil",
                "dim": 32,
                "epochs": 2,
                "n_boot": 10,
                "out_dir": str(tmp_path / "cls"),
            }
        )
    )
    res = run(main, ["train", "downstream", "--config", str(cfg)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    head = tmp_path / "cls" / "head.pt"
    assert head.is_file()

    bundle = tmp_path / "bundle"
    res = run(main, ["import-encoder", str(ckpt), "--out", str(bundle), "--head", f"subtype={head}"],
              catch_exceptions=False)  # fmt: skip
    assert res.exit_code == 0, res.output
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert manifest["preprocessing"]["field_um"] == 128.0 and manifest["preprocessing"]["patch_size"] == 224
    sub = next(m for m in manifest["models"] if m["name"] == "subtype")
    assert sub["role"] == "classifier" and set(sub["labels"]) <= {r["cancer_type"] for r in rows}

    roi = tmp_path / "roi.geojson"  # four 128 µm patches of the real slide: ViT-L on a CPU is slow
    x0, y0 = 1000, 1200
    ring = [[x0, y0], [x0 + 512, y0], [x0 + 512, y0 + 512], [x0, y0 + 512], [x0, y0]]
    roi.write_text(json.dumps({"type": "Polygon", "coordinates": [ring]}))
    out = tmp_path / "analysis"
    res = run(main, ["analyze", str(cmu_svs), "--bundle", str(bundle), "--out", str(out), "--roi", str(roi),
                     "--task", "embedding", "--task", "classification"], catch_exceptions=False)  # fmt: skip
    assert res.exit_code == 0, res.output
    result = json.loads((out / "result.json").read_text())
    assert result["tiling"]["field_um"] == pytest.approx(128.0) and 1 <= result["tiling"]["patches"] <= 9
    assert result["tiling"]["patch_size_level0"] * 0.499 == pytest.approx(128.0, rel=0.01)
    probs = result["classification"]["subtype"]["probabilities"]
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-4)

    served = _serve_and_analyze(tmp_path, bundle, cmu_svs, json.loads(roi.read_text()))
    assert served["bundle"]["name"] == "mSTAR" and served["tiling"]["field_um"] == pytest.approx(128.0)
    assert served["tiling"]["patches"] == result["tiling"]["patches"]
    np.testing.assert_allclose(served["embedding"]["values"], result["embedding"]["values"], atol=1e-4)
    got = served["classification"]["subtype"]["probabilities"]
    assert got.keys() == probs.keys() and all(abs(got[k] - probs[k]) < 1e-4 for k in probs)


def _serve_and_analyze(tmp_path: Path, bundle: Path, slide: Path, region: dict) -> dict:
    """`mstar serve` with the bundle (a real process, settings from MSTAR_* variables): upload the slide, analyse
    the region, wait for the job; checks the features and the bundle the API reports, returns the result."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSTAR_")}
    env.update(
        MSTAR_DATA_DIR=str(tmp_path / "serve-data"),
        MSTAR_BUNDLE_DIR=str(bundle),
        MSTAR_RUNNER_WORKERS="1",
        MSTAR_API_KEYS=json.dumps([{"tenant": "byow", "key": KEY}]),
        MSTAR_LOG_LEVEL="warning",
        OMP_NUM_THREADS="2",
    )
    with (
        mstar_serve(env, cwd=tmp_path, timeout=120, log=tmp_path / "serve.log", stop_timeout=60) as server,
        httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c,
    ):
        models = c.get("/models").json()
        assert models["bundle"] == "mSTAR" and models["demo"] is False
        assert {m["role"] for m in models["models"]} == {"patch_encoder", "classifier"}
        up = c.post("/slides", files={"file": (slide.name, slide.read_bytes())}, data={"analyze": "false"})
        assert up.status_code == 201, up.text
        job = c.post(
            f"/slides/{up.json()['id']}/analyses",
            json={"tasks": ["embedding", "classification"], "region": region},
        )
        assert job.status_code == 202, job.text
        job_url = job.headers["location"]
        deadline = time.monotonic() + 600  # ViT-L on a CPU: a few patches, a worker loading 1.2 GB of ONNX
        while time.monotonic() < deadline:
            state = c.get(job_url).json()
            if state["state"] in ("succeeded", "failed", "canceled"):
                break
            time.sleep(0.5)
        assert state["state"] == "succeeded", state
        result = c.get(f"{job_url}/result").json()
        assert result["status"] == "analyzed"
        feats = c.get(f"{job_url}/features")
        assert feats.status_code == 200
        with h5py.File(io.BytesIO(feats.content), "r") as f:
            assert f["features"].shape == (result["tiling"]["patches"], 1024)
            assert f["coords"].attrs["target_mpp"] == pytest.approx(128 / 224)  # 128 µm per 224 px patch
            assert f["coords"].attrs["patch_size_level0"] * 0.499 == pytest.approx(128.0, rel=0.01)
    if server.returncode not in (0, -15):
        print(server.output())
    return result
