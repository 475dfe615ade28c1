"""Stage 0 for weight-free runs: a small ViT distilled from the `tissue_stats_112` features (training.stage0)."""

from __future__ import annotations

import csv
import json

import h5py
import numpy as np
import pytest
import torch

from service.errors import InvalidParameterError
from training.extract import ExtractOptions, extract_cohort, load_encoder
from training.stage0 import Stage0Config, distill_stage0


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    from training.data.synth import SynthConfig, generate_cohort

    root = tmp_path_factory.mktemp("s0")
    generate_cohort(root / "cohort", SynthConfig(cases=4, seed=3, size=1024, workers=1))
    csv_path = root / "cohort" / "cohort.csv"
    opts = ExtractOptions(0.5, 112, batch_size=64, workers=1)
    extract_cohort(csv_path, "tissue_stats_112", root / "stats", options=opts)
    return {"root": root, "csv": csv_path, "stats": root / "stats", "opts": opts}


def test_distilled_vit_learns_the_statistics_and_loads_by_its_sidecar(cohort, tmp_path) -> None:
    cfg = Stage0Config(steps=30, batch_size=16, lr=2e-3, block=8, num_workers=0, splits=("train", "val", "test"))
    res = distill_stage0(cohort["csv"], cohort["stats"], tmp_path / "s0", cfg)
    rows = list(csv.DictReader((tmp_path / "s0" / "metrics.csv").open()))
    mse = np.array([float(r["mse"]) for r in rows])
    assert len(rows) == 30 and np.isfinite(mse).all()
    assert mse[-5:].mean() < 0.7 * mse[:3].mean()  # the regression of the standardised statistics is learnt

    sidecar = json.loads((tmp_path / "s0" / "student_backbone.pt.json").read_text())
    assert sidecar["arch"] == "vit_micro_112" and sidecar["stage"] == 0 and sidecar["teacher"] == "tissue_stats_112"
    assert len(sidecar["teacher_mean"]) == 41
    # the released timm key layout (no proj), loaded strictly through the sidecar, as `mstar extract` does
    state = torch.load(res["backbone"], weights_only=True)
    assert "cls_token" in state and not any(k.startswith("proj") for k in state)
    enc = load_encoder(res["backbone"])
    assert enc.name == "vit_micro_112" and enc.embed_dim == 96
    out = extract_cohort(cohort["csv"], res["backbone"], tmp_path / "f0", options=cohort["opts"])
    assert out["failed"] == 0 and out["done"] > 0
    with h5py.File(next((tmp_path / "f0").glob("*.h5")), "r") as f:
        assert f["features"].shape[1] == 96 and f.attrs["encoder"] == "vit_micro_112"


def test_same_seed_same_stage0(cohort, tmp_path) -> None:
    cfg = Stage0Config(steps=3, batch_size=8, block=8, num_workers=0, splits=("train", "val", "test"))
    a = torch.load(distill_stage0(cohort["csv"], cohort["stats"], tmp_path / "a", cfg)["backbone"], weights_only=True)
    b = torch.load(distill_stage0(cohort["csv"], cohort["stats"], tmp_path / "b", cfg)["backbone"], weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stage0_refuses_a_weight_free_encoder(cohort, tmp_path) -> None:
    with pytest.raises(InvalidParameterError, match="timm ViT"):
        distill_stage0(cohort["csv"], cohort["stats"], tmp_path / "x", Stage0Config(encoder="tissue_stats_112"))
