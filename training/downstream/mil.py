"""MIL heads over patch features (ABMIL, TransMIL, TransMIL_Pre) and the classification task.

Protocol (mSTAR §3, with its val/test leak fixed): Adam (lr 2e-4, wd 1e-5), cosine schedule over the epochs, one
bag per step; the epoch kept is the best on the **validation** split only, and the test split is scored once
with that model. `fit_mil` is shared with the survival task.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import numpy as np
import torch

from service.errors import InvalidParameterError
from training.checkpoints import head_from_stage1
from training.cohort import Case, FeatureStore, by_split, load_cohort, require_splits
from training.downstream.common import finish_run, sample_bag
from training.downstream.config import DownstreamConfig
from training.metrics import classification_metrics, macro_auc
from training.models.heads import MILHead

log = logging.getLogger(__name__)


def build_head(cfg: DownstreamConfig, n_features: int, n_outputs: int, task: str) -> MILHead:
    if cfg.aggregator == "transmil_pre":
        if cfg.stage1_checkpoint is None:
            raise InvalidParameterError("aggregator transmil_pre needs stage1_checkpoint")
        return head_from_stage1(cfg.stage1_checkpoint, n_outputs, task=task, transmil_kwargs=cfg.transmil)
    return MILHead(
        cfg.aggregator,
        n_features,
        n_outputs,
        task=task,
        dim=cfg.dim,
        dropout=cfg.dropout,
        transmil_kwargs=cfg.transmil,
    )


def output_layer(model: MILHead) -> torch.nn.Linear:
    """The head's last Linear (ABMIL `classifier`, TransMIL `_fc2`): the layer a survival head initialises."""
    return model.mil.classifier if model.kind == "abmil" else model.mil._fc2


@torch.no_grad()
def predict(model: MILHead, store: FeatureStore, cases: list[Case], forward: Any = None) -> list[Any]:
    model.eval()
    fwd = forward or _bag_forward
    return [fwd(model, store.case(c), c) for c in cases]


def class_probs(outs: list[Any]) -> np.ndarray:
    """Softmax class probabilities [N, C] of classification head outputs, one row per case."""
    return np.stack([o.logits.softmax(-1)[0].numpy() for o in outs])


def _bag_forward(model: Any, bag: torch.Tensor, case: Case) -> Any:
    return model(bag)


def fit_mil(
    cfg: DownstreamConfig,
    model: MILHead,
    store: FeatureStore,
    train: list[Case],
    loss_fn: Any,
    score_outputs: Any,
    val: list[Case] | None = None,
    select_on_loss: bool = False,
    forward: Any = None,
) -> tuple[MILHead, list[dict], int]:
    """Adam + cosine, one bag per step; keep the epoch with the best `score_outputs(outputs on val)`, or with
    `select_on_loss` the lowest validation loss (the score is then only recorded; ties go to the metric).

    The validation bags run through the model once per epoch, for both the score and the loss. Ties in the
    validation metric (common: a macro-AUC of 1.0 on an easy task) go to the lower validation loss, so a barely
    trained first epoch is not kept just because it ranks perfectly. `forward(model, bag, case)` replaces
    `model(bag)` for heads that take more than the bag (the slide + RNA heads).
    """
    fwd = forward or _bag_forward
    if cfg.epochs < 1:
        raise InvalidParameterError(f"epochs must be >= 1 to train a head, got {cfg.epochs}")
    opt = torch.optim.Adam(model.param_groups(cfg.lr, cfg.lr_pretrained), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.epochs, 1), eta_min=0)
    gen = torch.Generator().manual_seed(cfg.seed)
    best: tuple[float, float] = (-math.inf, -math.inf)
    best_state, best_epoch, history = None, -1, []
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(train), generator=gen).tolist()
        total = 0.0
        for i in order:
            case = train[i]
            out = fwd(model, sample_bag(store.case(case), cfg.max_patches, gen), case)
            loss = loss_fn(out, case)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        sched.step()
        outs = predict(model, store, val or [], forward)
        score = score_outputs(outs)
        with torch.no_grad():
            val_loss = float(np.mean([loss_fn(o, c).item() for o, c in zip(outs, val, strict=True)])) if val else 0.0
        history.append(
            {"epoch": epoch, "train_loss": total / max(len(train), 1), "val_score": score, "val_loss": val_loss}
        )
        log.info("epoch %d loss %.4f val %.4f (loss %.4f)", epoch, total / max(len(train), 1), score, val_loss)
        metric = score if np.isfinite(score) else -math.inf
        key = (-val_loss, metric) if select_on_loss else (metric, -val_loss)
        if best_state is None or key > best:
            best, best_state, best_epoch = key, copy.deepcopy(model.state_dict()), epoch
    model.load_state_dict(best_state)
    return model, history, best_epoch


def train_classification(cfg: DownstreamConfig) -> dict:
    store = FeatureStore(cfg.features_dir)
    cases = load_cohort(cfg.cohort)
    if cases and cfg.label_column not in cases[0].fields:
        raise InvalidParameterError(f"cohort has no label column '{cfg.label_column}'")
    cases = [c for c in cases if isinstance(c.fields.get(cfg.label_column), str) and c.fields[cfg.label_column]]
    splits = by_split(cases)
    require_splits(splits)
    labels = sorted({c.fields[cfg.label_column] for c in splits["train"]})
    if len(labels) < 2:
        raise InvalidParameterError("classification needs at least two classes in the training split")
    lab_idx = {lab: i for i, lab in enumerate(labels)}
    for split in ("val", "test"):
        splits[split] = [c for c in splits[split] if c.fields[cfg.label_column] in lab_idx]
    model = build_head(cfg, store.dim(splits["train"][0]), len(labels), "classification")

    def y_of(cs: list[Case]) -> np.ndarray:
        return np.array([lab_idx[c.fields[cfg.label_column]] for c in cs])

    def probs_of(cs: list[Case], m: MILHead) -> np.ndarray:
        return class_probs(predict(m, store, cs))

    def loss_fn(out: Any, case: Case) -> torch.Tensor:
        target = torch.tensor([lab_idx[case.fields[cfg.label_column]]])
        return torch.nn.functional.cross_entropy(out.logits, target)

    yv = y_of(splits["val"])
    model, history, best_epoch = fit_mil(
        cfg,
        model,
        store,
        splits["train"],
        loss_fn,
        lambda outs: macro_auc(yv, class_probs(outs)),
        splits["val"],
    )
    result = {"val": {}, "test": {}}
    preds = {}
    for split in ("val", "test"):
        y, p = y_of(splits[split]), probs_of(splits[split], model)
        result[split] = classification_metrics(y, p, n_boot=cfg.n_boot, seed=cfg.seed)
        preds[split] = {
            "case_ids": [c.case_id for c in splits[split]],
            "y_true": y.tolist(),
            "probs": p.tolist(),
        }
    meta = {"labels": labels, "n_features": model.mil.n_features}
    return finish_run(cfg, model, meta, result, preds, history, best_epoch)
