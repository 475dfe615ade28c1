"""Few-shot slide classification (§3.5): k labelled slides per class, k = 1, 2, 4, ... up to the smallest class.

Each method is averaged over `repeats` random draws of the support set from the training split (the same draws
for every method) and scored on the test split:
- **prototype** (slide embeddings): class mean of the L2-normalised support embeddings, cosine nearest
  prototype (softmax of 14.29·cos for AUC);
- **linear_probe** (slide embeddings): multinomial logistic regression (scikit-learn, L2, C=1);
- **patch_prototype** (the official variant): per class, all projected, L2-normalised patch embeddings of its
  k support slides are scored against that class's zero-shot text embedding, the top 100 by that logit are
  averaged (no renormalisation) into the prototype, and query slides are scored by MI-Zero top-j pooling of
  their patch-prototype logits. Patch embeddings are those of zero-shot (`zeroshot.patch_embeddings`:
  Stage-2 `proj(features)` when `patch_proj` is set, else the Stage-1 aggregator's output tokens); j is chosen
  on the validation split from `topk` (j = 10 without one). Needs `stage1_checkpoint` and prompts.

Slide embeddings: the Stage-1 aggregator's slide embedding when a checkpoint is given, and always the mean of
the patch features as a baseline. `fewshot_methods` selects the methods.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

from service.errors import InvalidParameterError
from training.checkpoints import load_patch_proj, load_stage1
from training.cohort import FeatureStore, by_split, load_cohort, require_splits
from training.downstream.common import finish_run, slide_embeddings, stage1_vision
from training.downstream.config import DownstreamConfig
from training.downstream.zeroshot import (
    class_embeddings,
    default_prompts_path,
    load_prompts,
    patch_embedding_name,
    patch_embeddings,
)
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
N_TOP_PATCHES = 100  # official: the prototype averages each class's 100 highest-scoring support patches
LOGIT_SCALE = 14.29


def support_draws(
    train_y: np.ndarray, shots: list[int], repeats: int, seed: int, n_classes: int
) -> Iterator[tuple[int, np.ndarray]]:
    """(k, support indices) for every k and repeat; the same seed gives every method the same draws."""
    rng = np.random.default_rng(seed)
    for k in shots:
        for _ in range(repeats):
            yield (
                k,
                np.concatenate([rng.choice(np.flatnonzero(train_y == c), k, replace=False) for c in range(n_classes)]),
            )


def _scores(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    return {"balanced_accuracy": balanced_accuracy(y, p), "accuracy": accuracy(y, p), "macro_auc": macro_auc(y, p)}


def _summarise(runs: list[dict[str, float]]) -> dict[str, float]:
    row = {}
    for metric in runs[0]:
        vals = np.array([r[metric] for r in runs])
        row[f"{metric}_mean"], row[f"{metric}_std"] = float(vals.mean()), float(vals.std())
    return row


def fewshot_curve(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    shots: list[int],
    repeats: int = 5,
    seed: int = 0,
    methods: Sequence[str] = tuple(METHODS),
) -> dict[str, dict[str, dict[str, float]]]:
    """{method: {k: {metric_mean, metric_std}}} over `repeats` support draws per k (slide-embedding methods)."""
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    runs: dict[str, dict[int, list[dict[str, float]]]] = {m: {k: [] for k in shots} for m in methods}
    for k, idx in support_draws(train_y, shots, repeats, seed, n_classes):
        for m in methods:
            runs[m][k].append(_scores(test_y, METHODS[m](train_x[idx], train_y[idx], test_x, n_classes)))
    return {m: {str(k): _summarise(runs[m][k]) for k in shots} for m in methods}


# ---- the official patch-level variant -------------------------------------------------------------
def patch_prototypes(
    support: Sequence[np.ndarray], support_y: np.ndarray, classifier: np.ndarray, n_top: int = N_TOP_PATCHES
) -> np.ndarray:
    """Prototypes `[C, E]`: per class c, the mean (not renormalised) of the `n_top` patches of its support
    slides with the highest logit against `classifier[c]`. Patches must be L2-normalised rows."""
    protos = []
    for c in range(classifier.shape[0]):
        members = np.flatnonzero(np.asarray(support_y) == c)
        if members.size == 0:
            raise InvalidParameterError(f"class {c} has no support slide")
        pool = np.concatenate([support[i] for i in members])
        top = np.argpartition(-(pool @ classifier[c]), min(n_top, len(pool)) - 1)[:n_top]
        protos.append(pool[top].mean(0))
    return np.stack(protos)


def mi_zero_pool(patches: np.ndarray, protos: np.ndarray, topj: Sequence[int]) -> dict[int, np.ndarray]:
    """MI-Zero top-j pooling against prototypes: per j, the mean of each class's j highest patch logits `[C]`."""
    desc = -np.sort(-(patches @ protos.T), axis=0)
    return {j: desc[: min(j, len(desc))].mean(0) for j in topj}


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = LOGIT_SCALE * logits
    z = z - z.max(1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(1, keepdims=True)


def patch_prototype_curves(
    train_patches: Sequence[np.ndarray],
    train_y: np.ndarray,
    queries: dict[str, tuple[Sequence[np.ndarray], np.ndarray]],
    classifier: np.ndarray,
    shots: list[int],
    topj: Sequence[int],
    repeats: int = 5,
    seed: int = 0,
    n_top: int = N_TOP_PATCHES,
) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """{query split: {j: {k: {metric_mean, metric_std}}}} for the official patch-prototype few-shot. `queries`
    maps a split name to (patch embeddings per slide, labels); every split sees the same support draws."""
    train_patches = [_norm(np.asarray(p, np.float32)) for p in train_patches]
    queries = {s: ([_norm(np.asarray(p, np.float32)) for p in qp], qy) for s, (qp, qy) in queries.items()}
    classifier = _norm(np.asarray(classifier, np.float32))
    runs = {s: {j: {k: [] for k in shots} for j in topj} for s in queries}
    for k, idx in support_draws(train_y, shots, repeats, seed, classifier.shape[0]):
        protos = patch_prototypes([train_patches[i] for i in idx], train_y[idx], classifier, n_top)
        for s, (qp, qy) in queries.items():
            pooled = [mi_zero_pool(p, protos, topj) for p in qp]
            for j in topj:
                runs[s][j][k].append(_scores(qy, _softmax(np.stack([q[j] for q in pooled]))))
    return {s: {str(j): {str(k): _summarise(runs[s][j][k]) for k in shots} for j in topj} for s in queries}


def _patch_sets(
    cfg: DownstreamConfig, store: Any, splits: dict[str, list], labels: list[str]
) -> tuple[dict, np.ndarray, str]:
    """Patch embeddings per case for each split, the zero-shot classifier `[C, E]`, and the embedding's name."""
    prompts = load_prompts(cfg.prompts or default_prompts_path())
    missing = [lab for lab in labels if lab not in prompts.classes]
    if missing:
        raise InvalidParameterError(f"patch_prototype few-shot needs prompts for every class; none for {missing}")
    enc = load_stage1(cfg.stage1_checkpoint)
    patch_proj = load_patch_proj(cfg.patch_proj) if cfg.patch_proj else None
    classifier = class_embeddings(enc.encode_text, prompts, labels).numpy()
    out = {}
    with torch.no_grad():
        for split, cases in splits.items():
            out[split] = []
            for c in cases:
                feats = store.case(c)
                tokens_out = enc.vision(feats.unsqueeze(0)) if patch_proj is None else None
                out[split].append(patch_embeddings(tokens_out, feats, patch_proj).float().numpy())
    return out, classifier, patch_embedding_name(patch_proj)


def run_fewshot(cfg: DownstreamConfig) -> dict:
    store = FeatureStore(cfg.features_dir)
    cases = [c for c in load_cohort(cfg.cohort) if isinstance(c.fields.get(cfg.label_column), str)]
    splits = by_split(cases)
    require_splits(splits, ("train", "test"))
    labels = sorted({c.fields[cfg.label_column] for c in splits["train"]})
    if len(labels) < 2:
        raise InvalidParameterError("few-shot needs at least two classes in the training split")
    lab_idx = {lab: i for i, lab in enumerate(labels)}
    train = splits["train"]
    test = [c for c in splits["test"] if c.fields[cfg.label_column] in lab_idx]
    val = [c for c in splits["val"] if c.fields[cfg.label_column] in lab_idx]
    ty = np.array([lab_idx[c.fields[cfg.label_column]] for c in train])
    qy = np.array([lab_idx[c.fields[cfg.label_column]] for c in test])
    shots = shot_schedule(int(np.bincount(ty, minlength=len(labels)).min()), cfg.shots)
    if not shots:
        raise InvalidParameterError("every class needs at least one training slide for few-shot")
    methods = list(cfg.fewshot_methods)
    if not methods:
        raise InvalidParameterError("fewshot_methods is empty: list prototype, linear_probe and/or patch_prototype")
    want_patch = "patch_prototype" in methods
    if want_patch and cfg.stage1_checkpoint is None:
        if "fewshot_methods" in cfg.model_fields_set:
            raise InvalidParameterError("few-shot method patch_prototype needs stage1_checkpoint (text encoder)")
        log.info("few-shot: no stage1_checkpoint, patch_prototype skipped")
        want_patch = False
    slide_methods = [m for m in methods if m in METHODS]
    result: dict[str, Any] = {"test": {}, "shots": shots, "labels": labels}
    if slide_methods:
        sources: dict[str, Any] = {"mean_patch_features": None}
        vision = stage1_vision(cfg)
        if vision is not None:
            sources["stage1_slide_embedding"] = vision
        for name, enc in sources.items():
            tx, qx = slide_embeddings(store, train, enc), slide_embeddings(store, test, enc)
            result["test"][name] = fewshot_curve(tx, ty, qx, qy, shots, cfg.fewshot_repeats, cfg.seed, slide_methods)
    if want_patch:
        patches, classifier, source = _patch_sets(cfg, store, {"train": train, "test": test, "val": val}, labels)
        queries = {"test": (patches["test"], qy)}
        if val:
            queries["val"] = (patches["val"], np.array([lab_idx[c.fields[cfg.label_column]] for c in val]))
        topj = list(cfg.topk)
        curves = patch_prototype_curves(
            patches["train"], ty, queries, classifier, shots, topj, cfg.fewshot_repeats, cfg.seed
        )
        if "val" in curves:  # one j for the whole curve: the best mean validation balanced accuracy over k
            val_by_j = {
                j: float(np.mean([r["balanced_accuracy_mean"] for r in by_k.values()]))
                for j, by_k in curves["val"].items()
            }
            best_j, selected_on = max(val_by_j, key=lambda j: val_by_j[j]), "val"
        else:
            val_by_j, best_j, selected_on = {}, str(min(topj, key=lambda j: abs(j - 10))), "default"
        result["test"].setdefault(source, {})["patch_prototype"] = curves["test"][best_j]
        result["patch_prototype"] = {
            "patch_embedding": source,
            "n_top_patches": N_TOP_PATCHES,
            "topj": int(best_j),
            "selected_on": selected_on,
            "val_balanced_accuracy_by_topj": val_by_j,
            "test_by_topj": curves["test"],
        }
    return finish_run(cfg, nn.Module(), {"labels": labels}, result, {"test": {}}, [], -1)
