"""Survival calibration and Brier scores: the maths on a cohort with known hazards, and `mstar eval` writing them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from training.downstream.cli import run
from training.downstream.config import DownstreamConfig
from training.downstream.synth import make_feature_cohort
from training.evaluate import evaluate_run
from training.survival import (
    brier_summary,
    choose_horizon,
    km_calibration,
    quantile_bin_edges,
    survival_at_inner_edges,
)


def _exp_cohort(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exponential times with hazard exp(x), uniform censoring: (hazard, time, event)."""
    rng = np.random.default_rng(seed)
    hazard = np.exp(rng.normal(size=n))
    t_event = rng.exponential(1.0 / hazard)
    t_cens = rng.uniform(0, 3.0, n)
    return hazard, np.minimum(t_event, t_cens), (t_event <= t_cens).astype(int)


@pytest.fixture(scope="module")
def data() -> dict:
    _, tr_t, tr_e = _exp_cohort(400, 0)
    hz, t, e = _exp_cohort(400, 1)
    edges = quantile_bin_edges(tr_t, tr_e, 4)
    true_s = np.exp(-hz[:, None] * edges[None, 1:])  # S at the end of each bin, as the head outputs it
    return {"tr_t": tr_t, "tr_e": tr_e, "t": t, "e": e, "edges": edges, "true_s": true_s}


def test_informative_predictor_beats_constant(data) -> None:
    d = data
    good = brier_summary(d["tr_t"], d["tr_e"], d["t"], d["e"], d["true_s"], d["edges"])
    assert len(good["times"]) == 3 and good["ibs"] is not None
    # a constant predictor equal to the training Kaplan-Meier curve is exactly the null model
    from sksurv.nonparametric import SurvivalFunctionEstimator
    from sksurv.util import Surv

    km = SurvivalFunctionEstimator().fit(Surv.from_arrays(d["tr_e"].astype(bool), d["tr_t"]))
    const_s = np.tile(np.append(km.predict_proba(d["edges"][1:-1]), 0.0), (len(d["t"]), 1))
    const = brier_summary(d["tr_t"], d["tr_e"], d["t"], d["e"], const_s, d["edges"])
    assert const["ibs"] == pytest.approx(const["null_ibs"], rel=1e-9)
    assert good["ibs"] < const["ibs"] - 0.02
    assert all(b < nb for b, nb in zip(good["brier"], good["null_brier"], strict=True))
    # the reverse-ordered predictor is worse than knowing nothing
    bad = brier_summary(d["tr_t"], d["tr_e"], d["t"], d["e"], d["true_s"][::-1], d["edges"])
    assert bad["ibs"] > const["ibs"]
    assert 0.0 < good["ibs"] < 0.25


def test_calibration_groups_and_horizon(data) -> None:
    d = data
    h = choose_horizon(d["edges"], d["t"])
    inner = d["edges"][1:-1]
    assert h in inner and abs(h - np.median(d["t"])) == pytest.approx(np.min(np.abs(inner - np.median(d["t"]))))
    grid, pred = survival_at_inner_edges(d["true_s"], d["edges"])
    col = pred[:, int(np.argmin(np.abs(grid - h)))]
    good = km_calibration(d["t"], d["e"], col, h, n_groups=4)
    assert [g["n"] for g in good["groups"]] == [100] * 4
    obs = [g["observed"] for g in good["groups"]]
    assert np.all(np.diff(obs) > 0)  # groups of higher predicted survival survive more
    assert good["mean_abs_error"] < 0.06
    inside = sum(g["ci_low"] <= g["predicted"] <= g["ci_high"] for g in good["groups"])
    assert inside >= 3
    # over-optimistic predictions (S^(1/3)) are far off
    worse = km_calibration(d["t"], d["e"], col ** (1 / 3), h, n_groups=4)
    assert worse["mean_abs_error"] > good["mean_abs_error"] + 0.1
    # a horizon past a group's follow-up gives no observed value, not an extrapolation
    late = km_calibration(d["t"], d["e"], col, float(d["t"].max()) + 1.0, n_groups=2)
    assert all(np.isnan(g["observed"]) for g in late["groups"]) and np.isnan(late["mean_abs_error"])


def test_eval_writes_survival_calibration_and_brier(tmp_path) -> None:
    torch.set_num_threads(1)
    make_feature_cohort(tmp_path / "c", n_cases=120, n_classes=2, dim=12, patches=(8, 16), seed=4)
    cfg = DownstreamConfig(
        task="survival",
        cohort=tmp_path / "c" / "cohort.csv",
        features_dir=tmp_path / "c" / "features",
        out_dir=tmp_path / "runs" / "survival",
        dim=16,
        epochs=2,
        n_boot=20,
    )
    run(cfg)
    preds = json.loads((cfg.out_dir / "predictions.json").read_text())
    assert len(preds["train"]["time"]) == len(preds["train"]["event"]) > 0
    evaluate_run(tmp_path / "runs")
    assert (tmp_path / "runs" / "plots" / "survival_survival_calibration.png").stat().st_size > 1000
    m = json.loads((tmp_path / "runs" / "metrics.json").read_text())["survival"]["test"]
    assert m["brier"]["censoring_from"] == "train"
    assert 0.0 < m["brier"]["ibs"] < 0.5 and 0.0 < m["brier"]["null_ibs"] < 0.5
    cal = m["survival_calibration"]
    assert cal["horizon"] in preds["meta"]["bin_edges"][1:-1]
    assert sum(g["n"] for g in cal["groups"]) == len(preds["test"]["time"])
    report = (tmp_path / "runs" / "report.md").read_text()
    assert "Brier" in report and "survival_calibration.png" in report and "integrated" in report
