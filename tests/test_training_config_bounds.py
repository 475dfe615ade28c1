"""Training settings that would give no run, a wrong metric or gradient ascent are refused when the config is read,
with one line naming each field (an audit found them accepted, or ending in a traceback deep in training)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from service.errors import InvalidParameterError
from training.config import Stage1Config, load_config
from training.downstream.config import DownstreamConfig
from training.stage1 import recall_at_k
from training.stage2 import Stage2Config

BASE = {
    Stage1Config: {"data": {"cohort": "cohort.csv", "features_dir": "features"}},
    Stage2Config: {"data": {"cohort": "cohort.csv", "features_dir": "features"}, "teacher": {"checkpoint": "t.pt"}},
    DownstreamConfig: {"task": "classification", "cohort": "cohort.csv", "features_dir": "features"},
}


def _load(tmp_path: Path, model, overrides: dict):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(BASE[model]))
    return load_config(path, model, overrides)


@pytest.mark.parametrize(
    ("model", "field", "value"),
    [
        (Stage1Config, "optim.grad_clip", -1.0),  # clip_grad_norm_ by a negative norm flips the gradient: ascent
        (Stage1Config, "optim.epochs", 0),  # "finished" and named a checkpoint it never wrote
        (Stage1Config, "optim.max_steps", 0),
        (Stage1Config, "optim.lr", -1.0),
        (Stage1Config, "optim.betas", [0.9, 2.0]),
        (Stage1Config, "optim.weight_decay", -1.0),
        (Stage1Config, "eval.knn_k", 0),  # reported the share of class 0 as accuracy
        (Stage1Config, "eval.recall_at", [0]),
        (Stage1Config, "eval.every_epochs", 0),  # ZeroDivisionError
        (Stage1Config, "model.init_temperature", 0.0),
        (Stage1Config, "model.aggregator.dim", 0),
        (Stage1Config, "model.gene.n_bins", 0),
        (Stage1Config, "num_threads", -1),
        (Stage2Config, "optim.grad_clip", -1.0),
        (Stage2Config, "optim.proj_lr", -1e-3),  # a parameter group's lr, which torch does not check
        (Stage2Config, "log_every", 0),
        (DownstreamConfig, "lr", -1e-3),  # trained "successfully" away from the labels (test AUC 0.14)
        (DownstreamConfig, "dim", 0),
        (DownstreamConfig, "max_patches", 0),  # empty bags
        (DownstreamConfig, "n_boot", 0),  # NaN intervals
        (DownstreamConfig, "dropout", 2.0),
    ],
)
def test_settings_that_cannot_train_are_refused_in_one_line(tmp_path: Path, model, field: str, value) -> None:
    with pytest.raises(InvalidParameterError) as err:
        _load(tmp_path, model, {field: value})
    message = str(err.value)
    assert "\n" not in message and field in message and "errors.pydantic.dev" not in message, message


def test_a_zero_learning_rate_stays_allowed(tmp_path: Path) -> None:
    """lr 0 is a frozen head (the untrained population null in the survival tests): allowed, only below 0 refused."""
    assert _load(tmp_path, DownstreamConfig, {"lr": 0.0}).lr == 0.0
    assert _load(tmp_path, Stage1Config, {"optim.grad_clip": None}).optim.grad_clip is None


def test_a_nan_match_is_a_miss_in_recall() -> None:
    """A NaN similarity outranks nothing (NaN > x is false), so a model gone NaN scored R@1 = 1.0."""
    q = torch.eye(4)
    q[2] = float("nan")
    assert recall_at_k(q, torch.eye(4), [1])[1] == pytest.approx(0.75)
