"""Survival heads: the untrained head is the population null (marginal hazards), and the kept epoch is the one with
the lowest validation NLL. Both guard the failure seen on the synthetic slide cohort, where a Stage-1-initialised
TransMIL was kept at an essentially untrained epoch (integrated Brier 0.49 against a Kaplan-Meier null of 0.18)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from service.errors import InvalidParameterError
from training.checkpoints import save_stage1
from training.downstream.cli import run
from training.downstream.config import DownstreamConfig
from training.downstream.synth import make_feature_cohort
from training.models.heads import MILHead
from training.models.mstar import MStar
from training.models.transmil import TransMIL
from training.survival import init_hazard_layer, marginal_hazards, nll_survival_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    make_feature_cohort(root, n_cases=120, n_classes=3, dim=16, patches=(8, 20), signal=1.5, seed=5)
    return root


def _cfg(cohort, tmp_path, **kw) -> DownstreamConfig:
    raw = {
        "task": "survival",
        "cohort": str(cohort / "cohort.csv"),
        "features_dir": str(cohort / "features"),
        "dim": 32,
        "n_boot": 20,
        "epochs": 4,
        "lr": 1e-3,
        **kw,
    }
    path = tmp_path / "survival.yaml"
    path.write_text(yaml.safe_dump(raw))
    return DownstreamConfig.from_yaml(path, out_dir=str(tmp_path / "run"))


def test_marginal_hazards_by_hand_and_minimise_the_loss() -> None:
    bins = np.array([0, 0, 1, 1, 2, 3, 3])
    events = np.array([1, 0, 1, 1, 0, 1, 0])
    h = marginal_hazards(bins, events, 4)
    # at risk 7, 5, 3, 2; deaths 1, 2, 0, 1 (bin 2 has none: clipped, not log(0))
    assert np.allclose(h, [1 / 7, 2 / 5, 1e-3, 1 / 2])

    def loss(hz: np.ndarray) -> float:
        hazards = torch.tensor(np.tile(hz, (len(bins), 1)))
        surv = torch.cumprod(1 - hazards, dim=1)
        return float(nll_survival_loss(hazards, surv, torch.tensor(bins), torch.tensor(1.0 - events)))

    best = loss(h)
    rng = np.random.default_rng(0)
    for _ in range(20):  # it is the constant-hazard maximum-likelihood estimate under this very loss
        assert loss(np.clip(h + rng.normal(0, 0.05, 4), 1e-3, 1 - 1e-3)) >= best - 1e-9


@pytest.mark.parametrize("kind", ["abmil", "transmil"])
def test_initialised_head_predicts_the_same_marginal_curve_for_every_bag(kind) -> None:
    torch.manual_seed(0)
    head = MILHead(kind, 12, 4, task="survival", dim=32, transmil_kwargs={"heads": 2, "num_landmarks": 8}).eval()
    hazards = np.array([0.1, 0.3, 0.2, 0.6])
    out_layer = head.mil.classifier if kind == "abmil" else head.mil._fc2
    init_hazard_layer(out_layer, hazards)
    with torch.no_grad():
        outs = [head(torch.randn(n, 12) * 5 + 3) for n in (5, 40)]
    for o in outs:
        assert torch.allclose(o.hazards[0], torch.tensor(hazards, dtype=torch.float32), atol=1e-6)
    assert torch.equal(outs[0].risk, outs[1].risk)
    with pytest.raises(InvalidParameterError, match="3 hazards"):
        init_hazard_layer(out_layer, hazards[:3])


def _stage1_ckpt(tmp_path, n_features: int) -> str:
    torch.manual_seed(1)
    vision = TransMIL(n_features=n_features, dim=32, heads=2, num_landmarks=8)
    with torch.no_grad():  # a large component shared by every slide, as in the demo's Stage-1 embedding
        vision.norm.bias.fill_(2.0)
    return str(save_stage1(tmp_path / "stage1.pt", MStar(vision, None, None)))


@pytest.mark.parametrize("aggregator", ["abmil", "transmil_pre"])
def test_untrained_survival_head_is_the_population_null(cohort, tmp_path, aggregator) -> None:
    """lr 0: the saved head is the head as `train_survival` built it. Every test case must get the training
    split's life-table curve (with the official random init each case got its own, far from it)."""
    extra = {"stage1_checkpoint": _stage1_ckpt(tmp_path, 16)} if aggregator == "transmil_pre" else {}
    cfg = _cfg(cohort, tmp_path, aggregator=aggregator, epochs=1, lr=0.0, lr_pretrained=0.0, **extra)
    run(cfg)
    preds = json.loads((cfg.out_dir / "predictions.json").read_text())
    edges = np.array(preds["meta"]["bin_edges"])
    t, e = np.array(preds["train"]["time"]), np.array(preds["train"]["event"])
    bins = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, 3)
    expected = np.cumprod(1 - marginal_hazards(bins, e, 4))
    surv = np.array(preds["test"]["survival"])
    assert np.allclose(surv, expected[None, :], atol=1e-5)


def test_survival_keeps_the_epoch_with_the_lowest_validation_nll(cohort, tmp_path) -> None:
    m = run(_cfg(cohort, tmp_path, epochs=5))
    losses = [h["val_loss"] for h in m["history"]]
    assert m["selection"] == "val_nll" and m["best_epoch"] == int(np.argmin(losses))
    assert m["test"]["c_index"]["value"] > 0.6

    # the official rule stays available: highest validation C-index, ties to the lower loss
    official = tmp_path / "official"
    official.mkdir()
    m = run(_cfg(cohort, official, epochs=5, survival_selection="val_c_index", survival_init="random"))
    keys = [(h["val_score"], -h["val_loss"]) for h in m["history"]]
    assert m["selection"] == "val_c_index" and m["best_epoch"] == max(range(5), key=keys.__getitem__)


def test_zero_epochs_is_refused(cohort, tmp_path) -> None:
    with pytest.raises(InvalidParameterError, match="epochs"):
        run(_cfg(cohort, tmp_path, epochs=0))
