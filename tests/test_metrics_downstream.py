"""Metrics (classification with bootstrap CIs, captioning via pycocoevalcap, Recall@K) and survival maths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from service.errors import InvalidParameterError
from training.metrics import (
    bootstrap,
    caption_metrics,
    classification_metrics,
    java_available,
    macro_auc,
    recall_at_k,
)
from training.survival import (
    assign_bins,
    bootstrap_c_index,
    c_index,
    hazards_and_survival,
    nll_survival_loss,
    quantile_bin_edges,
)


def test_macro_auc_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    p = rng.dirichlet(np.ones(3), 60)
    p[np.arange(60), y] += 0.5
    p /= p.sum(1, keepdims=True)
    assert macro_auc(y, p) == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    yb = rng.integers(0, 2, 40)
    pb = rng.dirichlet(np.ones(2), 40)
    assert macro_auc(yb, pb) == pytest.approx(roc_auc_score(yb, pb[:, 1]))
    assert np.isnan(macro_auc(np.zeros(5, int), np.full((5, 2), 0.5)))


def test_classification_metrics_and_ci() -> None:
    y = np.array([0, 0, 1, 1, 2, 2] * 5)
    perfect = np.eye(3)[y] * 0.9 + 0.1 / 3
    m = classification_metrics(y, perfect, n_boot=200)
    for name in ("macro_auc", "balanced_accuracy", "weighted_f1", "accuracy"):
        assert m[name]["value"] == pytest.approx(1.0)
    rng = np.random.default_rng(1)
    noisy = rng.dirichlet(np.ones(3), len(y))
    r = classification_metrics(y, noisy, n_boot=300)["macro_auc"]
    assert r["ci_low"] <= r["value"] <= r["ci_high"] and r["ci_high"] - r["ci_low"] > 0.05
    b = bootstrap(lambda a: float(np.mean(a)), np.arange(100.0), n_boot=500)
    assert b["ci_low"] < 49.5 < b["ci_high"]


def test_caption_metrics_pycocoevalcap() -> None:
    refs = ["the tumor is a grade two adenocarcinoma", "benign tissue with no tumor"]
    same = caption_metrics(refs, refs, meteor=False)
    assert same["BLEU_4"] == pytest.approx(1.0, abs=1e-6) and same["ROUGE_L"] == pytest.approx(1.0)
    hyp = ["the tumor is a grade three adenocarcinoma", "benign tissue no tumor seen"]
    m = caption_metrics(refs, hyp, meteor=False)
    # values computed independently with pycocoevalcap's own Bleu/Rouge scorers on the same dicts
    assert m["BLEU_1"] == pytest.approx(0.8333, abs=1e-3)
    assert m["BLEU_4"] == pytest.approx(0.5, abs=1e-3)
    assert m["ROUGE_L"] == pytest.approx(0.8286, abs=1e-3)
    assert np.isnan(m["METEOR"])
    with pytest.raises(ValueError):
        caption_metrics(refs, hyp[:1])


@pytest.mark.skipif(not java_available(), reason="METEOR needs a Java runtime")
def test_meteor_with_java() -> None:
    # one Java start (slow); an empty hypothesis and a newline must not desynchronise its line protocol
    refs = ["the tumor is a grade two adenocarcinoma", "benign tissue with no tumor", "margins are clear"]
    hyp = ["the tumor is a grade three adenocarcinoma", "benign\ntissue no tumor seen", ""]
    m = caption_metrics(refs, hyp, meteor=True)
    assert 0.2 < m["METEOR"] < 0.6


def test_recall_at_k() -> None:
    sim = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8], [0.65, 0.7, 0.6]])
    rel = np.eye(3, dtype=bool)
    r = recall_at_k(sim, rel, ks=(1, 2, 3))
    assert r == {"R@1": pytest.approx(1 / 3), "R@2": pytest.approx(2 / 3), "R@3": 1.0}


def test_bins_and_assignment() -> None:
    times = np.array([1, 2, 3, 4, 5, 6, 7, 8, 100.0])
    events = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0])
    edges = quantile_bin_edges(times, events, 4)
    assert len(edges) == 5 and edges[0] < 1 and edges[-1] > 100
    bins = assign_bins(times, edges)
    assert bins.min() == 0 and bins.max() == 3 and np.all(np.diff(bins) >= 0)
    assert np.bincount(bins[:8]).tolist() == [2, 2, 2, 2]  # quantiles of the uncensored times
    assert assign_bins([-5.0, 1e6], edges).tolist() == [0, 3]
    with pytest.raises(InvalidParameterError):
        quantile_bin_edges(times, np.zeros(9), 4)


def test_nll_survival_loss_by_hand() -> None:
    logits = torch.tensor([[0.0, 1.0, -1.0, 0.5]])
    h, s = hazards_and_survival(logits)
    hv = torch.sigmoid(logits)[0]
    # event in bin 2: S(1) * h(2)
    expected = -(torch.log((1 - hv[0]) * (1 - hv[1])) + torch.log(hv[2]))
    loss = nll_survival_loss(h, s, torch.tensor([2]), torch.tensor([0.0]))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # censored in bin 2: survived through bin 2 -> -log S(2)
    expected_c = -torch.log((1 - hv[0]) * (1 - hv[1]) * (1 - hv[2]))
    loss_c = nll_survival_loss(h, s, torch.tensor([2]), torch.tensor([1.0]))
    assert loss_c.item() == pytest.approx(expected_c.item(), rel=1e-5)


def test_c_index_and_bootstrap() -> None:
    rng = np.random.default_rng(0)
    risk = rng.normal(size=200)
    time = rng.exponential(np.exp(-risk))
    event = rng.random(200) < 0.8
    assert c_index(event, time, risk) > 0.65
    assert c_index(event, time, -risk) < 0.35
    b = bootstrap_c_index(event, time, risk, n_boot=200)
    assert b["ci_low"] < b["value"] < b["ci_high"]
