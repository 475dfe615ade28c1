"""Does the demo's Stage 2 help? Stage-0 vs Stage-2 ViT features of the demo chain, over several cohort seeds.

For each cohort seed (defaults 101, 202, 303: seeds the demo docs never tuned on) this runs the demo's own chain
(`training.demo`: synthetic cohort -> tissue_stats features -> Stage-0 ViT -> Stage 1 -> Stage-2 ViT) and then
evaluates both feature sets with the same `training.downstream` tasks, split and seeds:

- classification: ABMIL from scratch, test macro-AUC with the task's bootstrap 95% CI;
- survival: ABMIL from scratch, test C-index with the task's bootstrap 95% CI;
- retrieval: slide-to-slide recall@1/@5 (same cancer type) of mean-pooled patch features, on the test split;
- few-shot: prototype classifier on mean-pooled features, balanced accuracy at the largest shot count
  (mean over the task's repeated support draws).

ABMIL from scratch, not the Stage-1 aggregator: the aggregator was trained on Stage-0 features, so initialising a
head from it would favour them. `--context` builds each cohort as a context cohort (`SynthConfig.context`: every
type draws its tumour cells from one pool of cytologies, and only which cytologies co-occur on a slide tells the
type), the case where Stage 2 has slide-level knowledge to distil into patches. Per cohort the table also shows
what the teacher knows: Stage 1's last validation kNN cancer-type accuracy and the teacher-token cosine the
Stage-2 student reaches. The summary gives, per metric, the mean over cohort seeds of Stage 0, of Stage 2
and of the paired difference (Stage 2 - Stage 0) with a 95% t-interval over the seeds. Every step is cached in
--workdir, so a rerun continues where it stopped.

    OMP_NUM_THREADS=1 .venv/bin/python bench/demo_stages.py --workdir /tmp/demo_stages [--cases 60] \
        [--cohort-seeds 101 202 303] [--context]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training import demo  # noqa: E402

METRICS = ("test_macro_auc", "test_c_index", "recall_at_1", "recall_at_5", "fewshot_bacc")
TEACHER = ("stage1_val_knn", "stage2_teacher_cos")


def log(msg: str) -> None:
    print(f"== {msg}", flush=True)


def chain(work: Path, s: demo.DemoSettings, context: bool = False) -> tuple[Path, Path, Path]:
    """The demo chain up to the Stage-2 ViT's features; returns (cohort dir, Stage-0 features, Stage-2 features)."""
    if context and not (work / "cohort" / "cohort.csv").is_file():
        from training.data.synth import SynthConfig, generate_cohort

        log(f"context cohort: {s.cases} cases ...")
        generate_cohort(
            work / "cohort", SynthConfig(cases=s.cases, seed=s.seed, size=s.slide_size, workers=2, context=True)
        )
    cohort = demo._synth(work, s, log)  # reuses the cohort above when there is one
    stats = demo._extract(work, cohort, demo.STAGE0_TEACHER, "features_stats", log)
    stage0 = work / "stage0" / "student_backbone.pt"
    if not stage0.is_file():
        stage0 = demo._stage0(work, cohort, stats, s, log)
    f0 = demo._extract(work, cohort, stage0, "features_stage0", log)
    stage1 = work / "stage1" / "last.pt"
    if not stage1.is_file():
        stage1 = demo._stage1(work, cohort, f0, s, log)
    stage2 = work / "stage2" / "student_backbone.pt"
    if not stage2.is_file():
        stage2 = demo._stage2(work, cohort, f0, stage1, stage0, s, log)
    f2 = demo._extract(work, cohort, stage2, "features_stage2", log)
    return cohort, f0, f2


def evaluate(work: Path, cohort: Path, feats: Path, name: str, epochs: int, seed: int) -> dict:
    from training.downstream.cli import run
    from training.downstream.config import DownstreamConfig

    done = work / f"eval_{name}.json"
    if done.is_file():
        return json.loads(done.read_text())
    common = {"cohort": cohort / "cohort.csv", "features_dir": feats, "seed": seed, "n_boot": 500}
    out: dict = {}
    for task in ("classification", "survival"):
        m = run(
            DownstreamConfig(
                task=task,
                aggregator="abmil",
                epochs=epochs,
                max_patches=512,
                out_dir=work / f"ds_{name}_{task}",
                **common,
            ),
            overwrite=True,  # a bench rerun replaces its run
        )
        key = "macro_auc" if task == "classification" else "c_index"
        v = m["test"][key]
        out[f"test_{key}"] = v["value"]
        out[f"test_{key}_ci"] = [v["ci_low"], v["ci_high"]]
    retrieval = DownstreamConfig(task="retrieval", recall_ks=[1, 5], out_dir=work / f"ds_{name}_retrieval", **common)
    r = run(retrieval, overwrite=True)
    s2s = r["test"]["slide_to_slide"]["mean_patch_features"]
    out["recall_at_1"], out["recall_at_5"] = _recall(s2s, 1), _recall(s2s, 5)
    f = run(
        DownstreamConfig(task="fewshot", fewshot_methods=["prototype"], out_dir=work / f"ds_{name}_fewshot", **common),
        overwrite=True,
    )
    curve = f["test"]["mean_patch_features"]["prototype"]
    k = max(curve, key=lambda x: int(x))
    out["fewshot_bacc"], out["fewshot_k"] = curve[k]["balanced_accuracy_mean"], int(k)
    done.write_text(json.dumps(out))
    return out


def teacher(work: Path) -> dict:
    """What Stage 2 distils: Stage 1's last validation kNN type accuracy and the student's teacher-token cosine."""
    val = (work / "stage1" / "val_metrics.jsonl").read_text().splitlines()
    knn = json.loads(val[-1]).get("knn_acc", math.nan) if val else math.nan
    s2 = json.loads((work / "stage2" / "demo_summary.json").read_text())
    return {"stage1_val_knn": float(knn), "stage2_teacher_cos": float(s2.get("target_cos", math.nan))}


def _recall(table: dict, k: int) -> float:
    for key in (f"recall@{k}", f"R@{k}", str(k), k):
        if key in table:
            return float(table[key])
    raise KeyError(f"no recall at {k} in {sorted(map(str, table))}")


def t_interval(x: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval over cohort seeds (the half-width is nan for a single seed)."""
    from scipy import stats

    a = np.asarray(x, float)
    if len(a) < 2:
        return float(a.mean()), math.nan, math.nan
    h = stats.t.ppf(0.975, len(a) - 1) * a.std(ddof=1) / math.sqrt(len(a))
    return float(a.mean()), float(a.mean() - h), float(a.mean() + h)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/mstar_demo_stages"))
    ap.add_argument("--cases", type=int, default=60, help="cases per cohort (the demo builds 160)")
    ap.add_argument("--slide-size", type=int, default=1536)
    ap.add_argument("--cohort-seeds", type=int, nargs="+", default=[101, 202, 303])
    ap.add_argument("--stage0-steps", type=int, default=demo.DemoSettings.stage0_steps)
    ap.add_argument("--stage2-steps", type=int, default=demo.DemoSettings.stage2_steps)
    ap.add_argument("--epochs", type=int, default=20, help="ABMIL epochs")
    ap.add_argument("--head-seed", type=int, default=1)
    ap.add_argument("--context", action="store_true", help="context cohorts (the type only in slide-level context)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(1)
    base = demo.DemoSettings(
        cases=args.cases,
        slide_size=args.slide_size,
        stage0_steps=args.stage0_steps,
        stage2_steps=args.stage2_steps,
    )
    rows: dict[str, list[dict]] = {"stage0": [], "stage2": []}
    t0 = time.perf_counter()
    for cs in args.cohort_seeds:
        work = args.workdir / (f"context{cs}" if args.context else f"cohort{cs}")
        work.mkdir(parents=True, exist_ok=True)
        log(f"cohort seed {cs}: {args.cases} cases ({time.perf_counter() - t0:.0f} s)")
        cohort, f0, f2 = chain(work, replace(base, seed=cs), args.context)
        teach = teacher(work)
        log(f"  teacher: {json.dumps(teach)}")
        for name, feats in (("stage0", f0), ("stage2", f2)):
            log(f"  downstream tasks on {name} features ({time.perf_counter() - t0:.0f} s)")
            res = evaluate(work, cohort, feats, name, args.epochs, args.head_seed)
            rows[name].append({"cohort_seed": cs, **res, **teach})
    kind = "context" if args.context else "default"
    (args.workdir / f"results_{kind}.json").write_text(json.dumps(rows, indent=1))

    print(
        f"\n{kind} synthetic cohorts {args.cohort_seeds}, {args.cases} cases at {args.slide_size} px; "
        f"ABMIL {args.epochs} "
        f"epochs (head seed {args.head_seed}); Stage 0 {args.stage0_steps} steps, Stage 2 {args.stage2_steps} steps; "
        f"{time.perf_counter() - t0:.0f} s"
    )
    print(f"{'cohort':>6s} {'features':8s} " + " ".join(f"{m:>16s}" for m in METRICS))
    for i, cs in enumerate(args.cohort_seeds):
        for name in rows:
            r = rows[name][i]
            cells = []
            for m in METRICS:
                ci = r.get(f"{m}_ci")
                cells.append(f"{r[m]:.3f}" + (f" [{ci[0]:.2f},{ci[1]:.2f}]" if ci else ""))
            print(f"{cs:6d} {name:8s} " + " ".join(f"{c:>16s}" for c in cells))
    print(
        "\nteacher per cohort: "
        + ", ".join(
            f"{cs}: " + " ".join(f"{m} {rows['stage0'][i][m]:.3f}" for m in TEACHER)
            for i, cs in enumerate(args.cohort_seeds)
        )
    )
    print("\nmean over cohort seeds [95% t-interval over seeds]")
    for m in METRICS:
        a = [r[m] for r in rows["stage0"]]
        b = [r[m] for r in rows["stage2"]]
        ma, mb = t_interval(a)[0], t_interval(b)[0]
        d, lo, hi = t_interval([y - x for x, y in zip(a, b, strict=True)])
        print(f"{m:16s} stage0 {ma:.3f}  stage2 {mb:.3f}  stage2 - stage0 {d:+.3f} [{lo:+.3f}, {hi:+.3f}]")


if __name__ == "__main__":
    main()
