"""The demo bundle: built from a synthetic cohort on first use of `mstar analyze`, then served without torch.

Run here at a small scale (the real default trains on 160 cases; see training/demo.py)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

from service.cli.analyze import ensure_demo_bundle
from service.inference.bundle import load_bundle
from training import demo

MSTAR = Path(sys.executable).parent / "mstar"
SMALL = demo.DemoSettings(
    cases=24, slide_size=1024, stage0_steps=4, stage1_epochs=2, stage2_steps=3, head_epochs=2, report_epochs=2
)


def test_fold_standardization_is_exact() -> None:
    import torch

    from training.models.transmil import TransMIL

    torch.manual_seed(0)
    agg = TransMIL(n_features=12, dim=16, heads=2, num_landmarks=4).eval()
    mean, std = torch.randn(12), torch.rand(12) + 0.5
    x = torch.randn(1, 30, 12)
    folded = demo.fold_standardization(agg, mean, std)
    with torch.no_grad():
        a, b = agg((x - mean) / std), folded(x)
    torch.testing.assert_close(a.embedding, b.embedding, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.attention, b.attention, atol=1e-5, rtol=1e-5)


def test_split_manifest_keeps_the_asked_splits_with_absolute_slide_paths(tmp_path) -> None:
    # the feature passes that only Stage 0 (train) and Stage 1 (train, val) read extract only those slides
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    (cohort / "cohort.csv").write_text(
        "case_id,slide_id,slide_path,split\n"
        "C1,C1-S1,slides/C1-S1.svs,train\nC1,C1-S2,slides/C1-S2.tiff,train\n"
        "C2,C2-S1,slides/C2-S1.svs,val\nC3,C3-S1,slides/C3-S1.svs,test\n"
    )
    from training.extract import find_slides

    train = demo._split_manifest(cohort, ("train",), tmp_path / "work" / "stats.cohort.csv")
    jobs = find_slides(train)
    assert [j.slide_id for j in jobs] == ["C1-S1", "C1-S2"]
    assert jobs[1].path == (cohort / "slides" / "C1-S2.tiff").resolve()
    both = demo._split_manifest(cohort, demo.STAGE1_SPLITS, tmp_path / "s1.cohort.csv")
    assert [j.slide_id for j in find_slides(both)] == ["C1-S1", "C1-S2", "C2-S1"]


def test_first_use_builds_the_demo_bundle_then_analyze_serves_it(monkeypatch, capsys, tmp_path, cmu_svs) -> None:
    # the real first-use path (entry point -> training.demo.build_demo_bundle), at a small scale
    monkeypatch.setattr(demo, "DemoSettings", functools.partial(demo.DemoSettings, **SMALL.__dict__))
    bundle_dir = tmp_path / "model_repository"
    assert ensure_demo_bundle(bundle_dir) == bundle_dir
    logs = capsys.readouterr().err.splitlines()
    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    assert m.demo is True and m.preprocessing.patch_size == demo.PATCH_SIZE
    roles = {x.role for x in m.models}
    assert {"patch_encoder", "aggregator", "classifier", "survival", "text_encoder", "report_decoder"} <= roles
    labels = next(x for x in m.models if x.role == "classifier").labels
    assert labels == ["BRCA", "COAD", "HNSC", "LUSC"]
    # the patch encoder is the demo ViT that Stage 2 made from the Stage-0 ViT, exported to ONNX and parity-checked
    enc = next(x for x in m.models if x.role == "patch_encoder")
    assert enc.description == "VisionTransformer" and enc.outputs[0].shape == ["batch", 96]
    lineage = m.provenance.encoder
    assert lineage is not None and lineage.arch == demo.ENCODER == "vit_micro_112"
    assert lineage.timm_model.startswith("vit_") and lineage.stages == ["stage0", "stage2"]
    assert "tissue_stats_112" in lineage.details["stage0"] and "3 steps" in lineage.details["stage2"]
    parity = json.loads((bundle_dir / "parity.json").read_text())
    assert any(p["model"] == "mstar_patch_encoder" for p in parity)
    assert any("Stage 0" in line for line in logs) and any("Stage 2" in line for line in logs)
    assert any("building the demo bundle" in line for line in logs)
    assert any("Stage 1" in line for line in logs) and any("ready" in line for line in logs)
    # every progress line says the CPU seconds too (what compares on a shared machine), and the statistics
    # that Stage 0 regresses are extracted for its training slides only
    assert all("CPU s]" in line for line in logs if line.strip().startswith("["))
    assert any("tissue_stats_112" in line and "train slides" in line for line in logs)
    assert ensure_demo_bundle(bundle_dir) == bundle_dir  # second use: loads, no rebuild
    assert "building" not in capsys.readouterr().err

    env = {**os.environ, "MSTAR_BUNDLE_DIR": str(bundle_dir), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    res = subprocess.run(
        [
            str(MSTAR),
            "analyze",
            str(cmu_svs),
            "--out",
            str(out),
            "--prompt",
            "squamous cell carcinoma",
            "--prompt",
            "colon adenocarcinoma",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert "not a diagnosis" in summary["notice"]
    assert set(summary["classification"]["cancer_type"]["probabilities"]) == set(labels)
    assert isinstance(summary["report"], str) and summary["report"]
    scores = summary["zeroshot"]
    assert scores["best"] in ("squamous cell carcinoma", "colon adenocarcinoma")
    result = json.loads((out / "result.json").read_text())
    assert result["report"]["ai_generated"] is True
