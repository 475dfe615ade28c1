"""`mstar eval RUN_DIR`: one report over every downstream task run found under RUN_DIR.

Reads each task directory's `metrics.json` + `predictions.json` (written by `training.downstream.common.finish_run`) and
writes `RUN_DIR/report.md`, `RUN_DIR/metrics.json` (all tasks' test and val metrics) and PNG plots under
`RUN_DIR/plots/`: ROC curves, confusion matrix and calibration (classification, zero-shot), Kaplan-Meier
curves of predicted-risk groups with the log-rank p, a survival calibration plot and time-dependent / integrated
Brier scores (survival), few-shot curves, and generated reports beside the truth.
"""

from __future__ import annotations

import itertools
import json
import math
import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from service.errors import InvalidParameterError


def find_task_dirs(run_dir: Path) -> list[Path]:
    """Directories at or below `run_dir` (depth ≤ 3) with a downstream `metrics.json`."""
    out = []
    for p in sorted([run_dir / "metrics.json", *run_dir.glob("*/metrics.json"), *run_dir.glob("*/*/metrics.json")]):
        if p.is_file():
            try:
                data = json.loads(p.read_text())
            except json.JSONDecodeError:
                continue
            if isinstance(data, dict) and "task" in data and "history" in data:
                out.append(p.parent)
    return out


def _fmt(m: Any) -> str:
    if isinstance(m, dict) and "value" in m:
        v = m["value"]
        if not isinstance(v, (int, float)) or math.isnan(v):
            return "n/a"
        return f"{v:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"
    if isinstance(m, float):
        return "n/a" if math.isnan(m) else f"{m:.3f}"
    return str(m)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ---- plots ------------------------------------------------------------------------------------------------
def plot_roc(y: np.ndarray, probs: np.ndarray, labels: list[str], path: Path, title: str) -> None:
    from sklearn.metrics import auc, roc_curve

    fig, ax = plt.subplots(figsize=(5, 5))
    for c, lab in enumerate(labels):
        if (y == c).any() and (y != c).any():
            fpr, tpr, _ = roc_curve(y == c, probs[:, c])
            ax.plot(fpr, tpr, label=f"{lab} (AUC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(y: np.ndarray, probs: np.ndarray, labels: list[str], path: Path, title: str) -> None:
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(5, 5))
    ConfusionMatrixDisplay.from_predictions(
        y, probs.argmax(1), labels=list(range(len(labels))), display_labels=labels, ax=ax, colorbar=False
    )
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_calibration(y: np.ndarray, probs: np.ndarray, path: Path, title: str, n_bins: int = 10) -> float:
    """Reliability diagram of the top-label confidence; returns the expected calibration error."""
    conf, pred = probs.max(1), probs.argmax(1)
    correct = (pred == y).astype(float)
    edges = np.linspace(0, 1, n_bins + 1)
    xs, ys, ece = [], [], 0.0
    for lo, hi in itertools.pairwise(edges):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            xs.append(conf[m].mean())
            ys.append(correct[m].mean())
            ece += m.mean() * abs(conf[m].mean() - correct[m].mean())
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.plot(xs, ys, "o-")
    ax.set(xlabel="confidence", ylabel="accuracy", title=f"{title} (ECE {ece:.3f})", xlim=(0, 1), ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return float(ece)


def plot_km(time: np.ndarray, event: np.ndarray, risk: np.ndarray, path: Path, title: str) -> float:
    """Kaplan-Meier of high vs low predicted risk (split at the median); returns the log-rank p."""
    from lifelines import KaplanMeierFitter
    from lifelines.statistics import logrank_test

    high = risk > np.median(risk)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for mask, name in ((~high, "low risk"), (high, "high risk")):
        if mask.any():
            KaplanMeierFitter(label=f"{name} (n={int(mask.sum())})").fit(
                time[mask], event[mask]
            ).plot_survival_function(ax=ax, ci_show=True)
    p = float("nan")
    if high.any() and (~high).any():
        p = float(logrank_test(time[high], time[~high], event[high], event[~high]).p_value)
    ax.set(xlabel="time", ylabel="survival probability", title=f"{title} (log-rank p = {p:.2e})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return p


def plot_survival_calibration(calib: dict, path: Path, title: str) -> None:
    """Predicted S(horizon) per predicted-risk group against the Kaplan-Meier S(horizon) with its 95% CI."""
    groups = [g for g in calib["groups"] if np.isfinite(g["observed"])]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    if groups:
        x = np.array([g["predicted"] for g in groups])
        y = np.array([g["observed"] for g in groups])
        lo = np.array([g["ci_low"] for g in groups])
        hi = np.array([g["ci_high"] for g in groups])
        yerr = np.nan_to_num(np.vstack([y - lo, hi - y]), nan=0.0).clip(min=0)
        ax.errorbar(x, y, yerr=yerr, fmt="o-", capsize=3)
        for g, xi, yi in zip(groups, x, y, strict=True):
            ax.annotate(f"n={g['n']}", (xi, yi), textcoords="offset points", xytext=(5, -10), fontsize=7)
    ax.set(
        xlabel=f"predicted survival at t = {calib['horizon']:.3g}",
        ylabel="observed (Kaplan-Meier, 95% CI)",
        title=title,
        xlim=(0, 1),
        ylim=(0, 1.02),
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_fewshot(curves: dict, path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for source, methods in curves.items():
        for method, by_k in methods.items():
            ks = sorted(by_k, key=int)
            m = [by_k[k]["balanced_accuracy_mean"] for k in ks]
            s = [by_k[k]["balanced_accuracy_std"] for k in ks]
            ax.errorbar([int(k) for k in ks], m, yerr=s, marker="o", capsize=3, label=f"{source} / {method}")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="shots per class (k)", ylabel="balanced accuracy", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reports(refs: list[str], gens: list[str], base: list[str], path: Path, n: int = 4) -> None:
    n = min(n, len(refs))
    fig, axes = plt.subplots(n, 1, figsize=(11, 0.75 * n + 0.3))
    axes = np.atleast_1d(axes)
    for ax, r, g, b in zip(axes, refs, gens, base, strict=False):
        ax.axis("off")
        body = "\n".join(
            [
                "truth:      " + "\n            ".join(textwrap.wrap(r, 100)[:3]),
                "generated:  " + "\n            ".join(textwrap.wrap(g, 100)[:3]),
                "retrieved:  " + "\n            ".join(textwrap.wrap(b, 100)[:3]),
            ]
        )
        ax.text(0, 1, body, va="top", family="monospace", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- per task ---------------------------------------------------------------------------------------------
def _cls_section(name: str, metrics: dict, preds: dict, plots: Path, rel: str) -> list[str]:
    labels = preds.get("meta", {}).get("labels") or []
    out = [f"## {name}: classification ({metrics.get('aggregator', '')})"]
    rows = [
        [split] + [_fmt(metrics[split].get(k)) for k in ("macro_auc", "balanced_accuracy", "weighted_f1", "accuracy")]
        for split in ("val", "test")
        if split in metrics
    ]
    out.append(_table(["split", "macro-AUC", "balanced acc.", "weighted F1", "accuracy"], rows))
    out.append(f"\nBest epoch (validation macro-AUC): {metrics.get('best_epoch')}\n")
    test = preds.get("test")
    if test and labels:
        y, p = np.array(test["y_true"]), np.array(test["probs"])
        plot_roc(y, p, labels, plots / f"{name}_roc.png", f"{name}: test ROC")
        plot_confusion(y, p, labels, plots / f"{name}_confusion.png", f"{name}: test confusion")
        ece = plot_calibration(y, p, plots / f"{name}_calibration.png", f"{name}: calibration")
        metrics["test"]["ece"] = ece
        out += [
            f"![ROC]({rel}/{name}_roc.png) ![confusion]({rel}/{name}_confusion.png) "
            f"![calibration]({rel}/{name}_calibration.png)",
            "",
        ]
    return out


def _surv_section(name: str, metrics: dict, preds: dict, plots: Path, rel: str) -> list[str]:
    out = [f"## {name}: survival"]
    rows = [[split, _fmt(metrics[split]["c_index"])] for split in ("val", "test") if split in metrics]
    out.append(_table(["split", "C-index [95% CI]"], rows))
    summ = metrics.get("cohort_summary") or {}
    truth = {k: v for k, v in summ.items() if "c_index" in k.lower() and isinstance(v, (int, float))}
    if truth:
        out.append("\nCohort's true-risk C-index: " + ", ".join(f"{k} = {v:.3f}" for k, v in truth.items()))
    test = preds.get("test")
    if test:
        p = plot_km(
            np.array(test["time"]),
            np.array(test["event"]),
            np.array(test["risk"]),
            plots / f"{name}_km.png",
            f"{name}: test KM by predicted risk",
        )
        metrics["test"]["logrank_p"] = p
        out += [
            f"\nLog-rank p (high vs low predicted risk, median split): {p:.3g}",
            "",
            f"![KM]({rel}/{name}_km.png)",
            "",
        ]
        edges = preds.get("meta", {}).get("bin_edges")
        if edges and test.get("survival"):
            out += _surv_calibration(name, metrics, preds, plots, rel, np.asarray(edges, float))
    return out


def _surv_calibration(name: str, metrics: dict, preds: dict, plots: Path, rel: str, edges: np.ndarray) -> list[str]:
    """Brier scores at the inner bin edges and the calibration plot at the horizon (`training.survival`)."""
    from training.survival import brier_summary, choose_horizon, km_calibration, survival_at_inner_edges

    test = preds["test"]
    t, e, s = np.array(test["time"], float), np.array(test["event"]), np.array(test["survival"], float)
    ref = preds.get("train") or test  # runs from before train outcomes were saved: the test set's own censoring
    brier = brier_summary(np.array(ref["time"], float), np.array(ref["event"]), t, e, s, edges)
    brier["censoring_from"] = "train" if "train" in preds else "test"
    metrics["test"]["brier"] = brier
    out = [f"Time-dependent Brier score (IPCW, censoring from the {brier['censoring_from']} split; lower is better):"]
    if brier["times"] and brier["brier"]:
        rows = [
            [f"{ti:.3g}", f"{b:.3f}", f"{nb:.3f}"]
            for ti, b, nb in zip(brier["times"], brier["brier"], brier["null_brier"], strict=True)
        ]
        if brier["ibs"] is not None:
            rows.append(["integrated", f"{brier['ibs']:.3f}", f"{brier['null_ibs']:.3f}"])
        out += ["", _table(["time", "model", "Kaplan-Meier null"], rows)]
    else:
        out.append(brier.get("note", "not computable"))
    horizon = choose_horizon(edges, t)
    if horizon is not None:
        grid, pred = survival_at_inner_edges(s, edges)
        n_groups = int(np.clip(len(t) // 15, 2, 5))
        calib = km_calibration(t, e, pred[:, int(np.argmin(np.abs(grid - horizon)))], horizon, n_groups)
        metrics["test"]["survival_calibration"] = calib
        plot_survival_calibration(
            calib, plots / f"{name}_survival_calibration.png", f"{name}: calibration at t = {horizon:.3g}"
        )
        out += [
            "",
            f"Calibration at t = {horizon:.3g} (the inner bin edge nearest the median test time), {n_groups} groups "
            f"of predicted risk: mean |predicted - Kaplan-Meier| = {calib['mean_abs_error']:.3f}",
            "",
            f"![survival calibration]({rel}/{name}_survival_calibration.png)",
            "",
        ]
    return out


def _report_section(name: str, metrics: dict, preds: dict, plots: Path, rel: str) -> list[str]:
    out = [f"## {name}: report generation"]
    keys = ["BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L"]
    rows = []
    for split in ("val", "test"):
        if split in metrics:
            for method in ("generated", "retrieval_baseline"):
                rows.append([split, method] + [_fmt(metrics[split][method].get(k, float("nan"))) for k in keys])
    out.append(_table(["split", "method", *keys], rows))
    test = preds.get("test")
    if test:
        plot_reports(test["reference"], test["generated"], test["retrieval_baseline"], plots / f"{name}_examples.png")
        out += ["", "Examples (test):", ""]
        for r, g, b in list(zip(test["reference"], test["generated"], test["retrieval_baseline"], strict=True))[:4]:
            out += [f"- truth: {r}", f"  - generated: {g}", f"  - retrieved: {b}"]
        out += ["", f"![examples]({rel}/{name}_examples.png)", ""]
    return out


def _zeroshot_section(name: str, metrics: dict, preds: dict, plots: Path, rel: str) -> list[str]:
    out = [f"## {name}: zero-shot (patch embeddings: {metrics.get('patch_embedding')})"]
    rows = []
    for split in ("val", "test"):
        for method, m in (metrics.get(split) or {}).items():
            rows.append(
                [split, method]
                + [_fmt(m.get(k)) for k in ("accuracy", "balanced_accuracy", "weighted_f1", "macro_auc")]
            )
    out.append(_table(["split", "method", "accuracy", "balanced acc.", "weighted F1", "macro-AUC"], rows))
    out.append(
        f"\nChance accuracy: {metrics.get('chance_accuracy', float('nan')):.3f}; "
        f"MI-Zero top-k selected on validation: {metrics.get('selected_on_val', {}).get('mi_zero')}\n"
    )
    test, labels = preds.get("test"), preds.get("meta", {}).get("labels")
    if test and labels:
        y = np.array(test["y_true"])
        for method in ("slide_level", preds.get("best")):
            if method in test["methods"]:
                p = np.array(test["methods"][method])
                plot_confusion(y, p, labels, plots / f"{name}_{method}_confusion.png", f"{name}: {method}")
                out.append(f"![{method}]({rel}/{name}_{method}_confusion.png)")
        out.append("")
    return out


def _fewshot_section(name: str, metrics: dict, preds: dict, plots: Path, rel: str) -> list[str]:
    out = [f"## {name}: few-shot (test balanced accuracy, mean ± sd over draws)"]
    curves = metrics.get("test", {})
    shots = [str(k) for k in metrics.get("shots", [])]
    rows = []
    for source, methods in curves.items():
        for method, by_k in methods.items():
            rows.append(
                [source, method]
                + [f"{by_k[k]['balanced_accuracy_mean']:.3f} ± {by_k[k]['balanced_accuracy_std']:.3f}" for k in shots]
            )
    out.append(_table(["embedding", "method", *[f"k={k}" for k in shots]], rows))
    pp = metrics.get("patch_prototype")
    if pp:
        out.append(
            f"\npatch_prototype (official): prototypes = mean of each class's {pp['n_top_patches']} support patches "
            f"with the highest zero-shot logit ({pp['patch_embedding']}); queries by MI-Zero top-{pp['topj']} "
            f"pooling (j chosen on {pp['selected_on']})."
        )
    if curves:
        plot_fewshot(curves, plots / f"{name}_curve.png", f"{name}: few-shot")
        out += ["", f"![few-shot]({rel}/{name}_curve.png)", ""]
    return out


def _retrieval_section(name: str, metrics: dict, preds: dict, plots: Path, rel: str) -> list[str]:
    out = [f"## {name}: retrieval (test, n = {metrics.get('n_test')})"]
    rows = []
    for kind, val in (metrics.get("test") or {}).items():
        if kind == "slide_to_slide":
            for src, rk in val.items():
                rows.append([f"slide→slide ({src})"] + [f"{v:.3f}" for v in rk.values()])
        else:
            rows.append([kind.replace("_to_", "→")] + [f"{v:.3f}" for v in val.values()])
    ks = next(iter(next(iter(metrics["test"].values())).values())) if metrics.get("test") else {}
    header = list(ks.keys()) if isinstance(ks, dict) else []
    out += [_table(["query→gallery", *header], rows), ""]
    return out


SECTIONS = {
    "classification": _cls_section,
    "survival": _surv_section,
    "report": _report_section,
    "zeroshot": _zeroshot_section,
    "fewshot": _fewshot_section,
    "retrieval": _retrieval_section,
}


def evaluate_run(run_dir: str | Path) -> dict:
    """Write report.md, metrics.json and plots for every task run under `run_dir`; return the metrics."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InvalidParameterError(f"run directory {run_dir} does not exist")
    task_dirs = find_task_dirs(run_dir)
    if not task_dirs:
        raise InvalidParameterError(f"no downstream task results (metrics.json) under {run_dir}")
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    lines = [
        f"# Downstream evaluation: {run_dir.name}",
        "",
        "Models were selected on the validation split only; test metrics are point estimates with "
        "percentile 95% bootstrap CIs.",
        "",
    ]
    all_metrics: dict[str, Any] = {}
    for d in task_dirs:
        metrics = json.loads((d / "metrics.json").read_text())
        pred_path = d / "predictions.json"
        preds = json.loads(pred_path.read_text()) if pred_path.is_file() else {}
        name = d.name if d != run_dir else metrics["task"]
        meta = preds.get("meta", {})
        metrics["aggregator"] = meta.get("aggregator")
        section = SECTIONS.get(metrics["task"])
        if section is None:
            continue
        lines += section(name, metrics, preds, plots, "plots")
        all_metrics[name] = {k: v for k, v in metrics.items() if k != "history"}
    # a single task run already owns RUN_DIR/metrics.json: do not overwrite it
    (run_dir / "metrics.json" if run_dir not in task_dirs else run_dir / "eval_metrics.json").write_text(
        json.dumps(all_metrics, indent=2, default=float)
    )
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
    return all_metrics
