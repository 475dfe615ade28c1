"""Few-shot slide classification on slide embeddings (§3.5): k labelled slides per class, k = 1, 2, 4, ...

Two classifiers on L2-normalised slide embeddings, each averaged over `repeats` random draws of the support
set from the training split and scored on the test split:
- **prototypes**: class mean of the support embeddings, cosine nearest prototype (softmax of 14.29·cos for
  AUC);
- **linear probe**: multinomial logistic regression (scikit-learn, L2, C=1) on the support embeddings.

Embeddings: the Stage-1 aggregator's slide embedding when a checkpoint is given, and always the mean of the
patch features as a baseline. (The official few-shot code builds prototypes from the top-100
zero-shot-scored patches instead; that variant needs the Stage-2 `proj` and is not implemented here.)
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression

from service.errors import InvalidParameterError
from training.metrics import accuracy, balanced_accuracy, macro_auc

log = logging.getLogger(__name__)


def shot_schedule(min_class_count: int, shots: list[int] | None = None) -> list[int]:
    """Powers of two up to the smallest training class (or the given list, clipped to it)."""
    if shots:
        return [k for k in shots if 1 <= k <= min_class_count]
    out, k = [], 1
    while k <= min_class_count:
        out.append(k)
        k *= 2
    return out


def _norm(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def prototype_probs(sx: np.ndarray, sy: np.ndarray, qx: np.ndarray, n_classes: int) -> np.ndarray:
    protos = _norm(np.stack([_norm(sx)[sy == c].mean(0) for c in range(n_classes)]))
    logits = 14.29 * _norm(qx) @ protos.T
    logits -= logits.max(1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(1, keepdims=True)


def linear_probe_probs(sx: np.ndarray, sy: np.ndarray, qx: np.ndarray, n_classes: int) -> np.ndarray:
    clf = LogisticRegression(C=1.0, max_iter=2000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.fit(_norm(sx), sy)
    probs = np.zeros((len(qx), n_classes))
    probs[:, clf.classes_] = clf.predict_proba(_norm(qx))
    return probs


METHODS = {"prototype": prototype_probs, "linear_probe": linear_probe_probs}


def fewshot_curve(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    shots: list[int],
    repeats: int = 5,
    seed: int = 0,
) -> dict[str, dict[str, dict[str, float]]]:
    """{method: {k: {metric_mean, metric_std}}} over `repeats` support draws per k."""
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, dict[str, float]]] = {m: {} for m in METHODS}
    for k in shots:
        runs: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
        for _ in range(repeats):
            idx = np.concatenate([rng.choice(np.flatnonzero(train_y == c), k, replace=False) for c in range(n_classes)])
            for m, fn in METHODS.items():
                p = fn(train_x[idx], train_y[idx], test_x, n_classes)
                runs[m].append(
                    {
                        "balanced_accuracy": balanced_accuracy(test_y, p),
                        "accuracy": accuracy(test_y, p),
                        "macro_auc": macro_auc(test_y, p),
                    }
                )
        for m in METHODS:
            row = {}
            for metric in runs[m][0]:
                vals = np.array([r[metric] for r in runs[m]])
                row[f"{metric}_mean"], row[f"{metric}_std"] = float(vals.mean()), float(vals.std())
            out[m][str(k)] = row
    return out


def run_fewshot(cfg: Any) -> dict:
    from training.downstream import _finish, _stage1_vision, slide_embeddings
    from training.downstream_data import FeatureStore, by_split, load_cases, require_splits

    store = FeatureStore(cfg.features_dir)
    cases = [c for c in load_cases(cfg.cohort) if isinstance(c.fields.get(cfg.label_column), str)]
    splits = by_split(cases)
    require_splits(splits, ("train", "test"))
    labels = sorted({c.fields[cfg.label_column] for c in splits["train"]})
    if len(labels) < 2:
        raise InvalidParameterError("few-shot needs at least two classes in the training split")
    lab_idx = {lab: i for i, lab in enumerate(labels)}
    train = splits["train"]
    test = [c for c in splits["test"] if c.fields[cfg.label_column] in lab_idx]
    ty = np.array([lab_idx[c.fields[cfg.label_column]] for c in train])
    qy = np.array([lab_idx[c.fields[cfg.label_column]] for c in test])
    shots = shot_schedule(int(np.bincount(ty, minlength=len(labels)).min()), cfg.shots)
    if not shots:
        raise InvalidParameterError("every class needs at least one training slide for few-shot")
    sources: dict[str, Any] = {"mean_patch_features": None}
    vision = _stage1_vision(cfg)
    if vision is not None:
        sources["stage1_slide_embedding"] = vision
    result: dict[str, Any] = {"test": {}, "shots": shots, "labels": labels}
    for name, enc in sources.items():
        tx, qx = slide_embeddings(store, train, enc), slide_embeddings(store, test, enc)
        result["test"][name] = fewshot_curve(tx, ty, qx, qy, shots, cfg.fewshot_repeats, cfg.seed)
    import torch.nn as nn

    return _finish(cfg, nn.Module(), {"labels": labels}, result, {"test": {}}, [], -1)
