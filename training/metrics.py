"""Evaluation metrics for the downstream tasks.

- Classification: macro one-vs-rest AUC (binary: positive-class AUC), balanced accuracy, weighted F1
  (scikit-learn), each with a percentile bootstrap CI (the official code bootstraps the test set 1000× with
  replacement).
- Captioning: BLEU-1..4, METEOR and ROUGE-L computed by pycocoevalcap on pre-tokenised, lower-cased strings,
  exactly as HistGen/R2Gen call it (METEOR runs the bundled Java jar).
- Retrieval: Recall@K from a similarity matrix and a relevance matrix.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from collections.abc import Callable, Sequence

import numpy as np
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

log = logging.getLogger(__name__)


def macro_auc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Macro OvR AUC over the classes present; binary uses the positive column. NaN if one class only."""
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=float)
    present = np.unique(y_true)
    if present.size < 2:
        return float("nan")
    if probs.shape[1] == 2:
        return float(roc_auc_score(y_true, probs[:, 1]))
    aucs = [roc_auc_score(y_true == c, probs[:, c]) for c in present]
    return float(np.mean(aucs))


def balanced_accuracy(y_true: np.ndarray, probs: np.ndarray) -> float:
    return float(balanced_accuracy_score(y_true, np.asarray(probs).argmax(1)))


def weighted_f1(y_true: np.ndarray, probs: np.ndarray) -> float:
    return float(f1_score(y_true, np.asarray(probs).argmax(1), average="weighted", zero_division=0))


def accuracy(y_true: np.ndarray, probs: np.ndarray) -> float:
    return float(np.mean(np.asarray(probs).argmax(1) == np.asarray(y_true)))


CLASSIFICATION_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "macro_auc": macro_auc,
    "balanced_accuracy": balanced_accuracy,
    "weighted_f1": weighted_f1,
    "accuracy": accuracy,
}


def bootstrap(fn: Callable[..., float], *arrays: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """Point value on the full set plus percentile 95% CI over `n_boot` resamples (NaN resamples
    dropped)."""
    arrays = tuple(np.asarray(a) for a in arrays)
    n = len(arrays[0])
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # resamples may miss a class; that is what the CI measures
            v = fn(*(a[idx] for a in arrays))
        if np.isfinite(v):
            vals.append(v)
    arr = np.asarray(vals) if vals else np.asarray([np.nan])
    return {
        "value": float(fn(*arrays)),
        "mean": float(np.nanmean(arr)),
        "std": float(np.nanstd(arr)),
        "ci_low": float(np.nanpercentile(arr, 2.5)),
        "ci_high": float(np.nanpercentile(arr, 97.5)),
        "n": int(n),
    }


def classification_metrics(
    y_true: np.ndarray, probs: np.ndarray, n_boot: int = 1000, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Every classification metric with its bootstrap CI."""
    return {name: bootstrap(fn, y_true, probs, n_boot=n_boot, seed=seed) for name, fn in CLASSIFICATION_METRICS.items()}


def _clean(text: str) -> str:
    # METEOR's Java process reads one line per segment: a newline or an empty string would desynchronise it.
    text = " ".join(str(text).split())
    return text if text else "."


def java_available() -> bool:
    return shutil.which("java") is not None


def caption_metrics(references: Sequence[str], hypotheses: Sequence[str], meteor: bool = True) -> dict[str, float]:
    """Corpus BLEU-1..4, METEOR and ROUGE-L (pycocoevalcap). METEOR is NaN when skipped or without Java."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.rouge.rouge import Rouge

    if len(references) != len(hypotheses) or not references:
        raise ValueError("references and hypotheses must be non-empty and of equal length")
    gts = {i: [_clean(r)] for i, r in enumerate(references)}
    res = {i: [_clean(h)] for i, h in enumerate(hypotheses)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"BLEU_{i + 1}": float(b) for i, b in enumerate(bleu)}
    out["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    out["METEOR"] = float("nan")
    if meteor and java_available():
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        try:
            out["METEOR"] = float(scorer.compute_score(gts, res)[0])
        finally:
            del scorer  # its __del__ ends the Java process
    elif meteor:
        log.warning("java not found: METEOR skipped")
    return out


def recall_at_k(similarity: np.ndarray, relevant: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Fraction of queries with at least one relevant item among their top-K by similarity.

    similarity, relevant: `[Q, G]`; mask self-matches beforehand (e.g. set their similarity to -inf).
    """
    similarity = np.asarray(similarity, dtype=float)
    relevant = np.asarray(relevant, dtype=bool)
    order = np.argsort(-similarity, axis=1, kind="stable")
    ranked_rel = np.take_along_axis(relevant, order, axis=1)
    out = {}
    for k in ks:
        out[f"R@{k}"] = float(ranked_rel[:, : min(k, similarity.shape[1])].any(axis=1).mean())
    return out
