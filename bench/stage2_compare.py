"""The seed paper's own check of Stage 2, run on a synthetic cohort on the CPU: slide-level cancer-type
classification (macro-AUC) and survival (C-index) with an ABMIL head (`training.downstream`), on
features from (a) the Stage-0 patch encoder and (b) the Stage-2 encoder; same cohort, split, head and seeds.

Chain (each step cached in --workdir, so a rerun continues where it stopped):
 1. `mstar synth` cohort (slides, reports, RNA, survival);
 2. Stage-0 encoder: no pretrained weights exist offline, so a random `vit_micro_112` with LayerScale reset to 1
    (`init_random_stage0`) stands in for UNI;
 3. Stage-0 features of every slide (`extract_cohort`);
 4. Stage 1 (`training.stage1.train_stage1`, small TransMIL + tiny BERT + RNA encoder) on those features;
 5. Stage 2 (`training.stage2.train_stage2`) on the train-split slides, teacher = the Stage-1 aggregator;
 6. Stage-2 features with the exported student backbone;
 7. ABMIL classification + survival on both feature sets; the table is printed and written to results.json.

    .venv/bin/python bench/stage2_compare.py --workdir /tmp/s2cmp [--cases 40] [--stage2-steps 80] [--seeds 1 2]
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.extract import ExtractOptions, extract_cohort  # noqa: E402
from training.stage2 import init_random_stage0  # noqa: E402

ENCODER = "vit_micro_112"
OPTS = ExtractOptions(target_mpp=0.5, patch_size=112, batch_size=64, workers=2)


def step(msg: str) -> None:
    print(f"== {msg}", flush=True)


def make_cohort(work: Path, cases: int, seed: int) -> Path:
    cohort = work / "cohort" / "cohort.csv"
    if not cohort.is_file():
        from training.data.synth import SynthConfig, generate_cohort

        step(f"synthetic cohort: {cases} cases")
        generate_cohort(work / "cohort", SynthConfig(cases=cases, seed=seed, size=1536, workers=2))
    return cohort


def features(cohort: Path, encoder: Path, out: Path) -> None:
    summary = extract_cohort(cohort, encoder, out, options=OPTS)
    step(
        f"features -> {out.name}: {summary['done']} done, {summary['skipped']} skipped, {summary['failed']} failed "
        f"({summary['patches_per_s']} patches/s)"
    )


def stage1(work: Path, cohort: Path, feats: Path, epochs: int) -> Path:
    ckpt = work / "stage1" / "last.pt"
    if ckpt.is_file():
        return ckpt
    from training.config import Stage1Config, load_config
    from training.models.text_encoder import build_tiny_bert
    from training.stage1 import train_stage1

    step("stage 1 (TransMIL dim 128 + tiny BERT + RNA encoder)")
    texts = [json.loads(x)["text"] for x in (cohort.parent / "reports.jsonl").read_text().splitlines() if x]
    bert = build_tiny_bert(work / "bert", texts, vocab_size=400, hidden=64, layers=1, heads=2)
    cfg = {
        "data": {"cohort": str(cohort), "features_dir": str(feats), "n_patches": 256},
        "model": {
            "aggregator": {"dim": 128, "heads": 4, "num_landmarks": 32},
            "text": {"model_dir": str(bert), "max_length": 128, "lr": 1e-3},
            "gene": {"dim": 32, "heads": 2, "dim_head": 16},
        },
        "optim": {"epochs": epochs, "batch_size": 8, "per_class": 2, "lr": 5e-4},
        "eval": {"every_epochs": epochs},
        "out_dir": str(work / "stage1"),
        "seed": 0,
        "amp": False,
    }
    path = work / "stage1.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = train_stage1(load_config(path, Stage1Config), overwrite=True)  # a bench rerun replaces its run
    step(f"stage 1 done: {json.dumps(res['metrics'])}")
    return ckpt


def stage2(work: Path, cohort: Path, feats: Path, teacher: Path, stage0: Path, steps: int) -> Path:
    out = work / "stage2"
    if (out / "student_backbone.pt").is_file():
        return out / "student_backbone.pt"
    from training.config import load_config
    from training.stage2 import Stage2Config, train_stage2

    step(f"stage 2 ({steps} steps)")
    cfg = {
        "data": {
            "cohort": str(cohort),
            "features_dir": str(feats),
            "n_patches": 256,
            "num_workers": 1,
            "splits": ["train"],
        },
        "teacher": {"checkpoint": str(teacher)},
        "student": {"encoder": ENCODER, "init_checkpoint": str(stage0)},
        "optim": {"epochs": 100, "batch_size": 64, "lr": 5e-5, "proj_lr": 1e-3, "max_steps": steps},
        "out_dir": str(out),
        "seed": 0,
        "amp": False,
    }
    path = work / "stage2.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = train_stage2(load_config(path, Stage2Config), overwrite=True)  # a bench rerun replaces its run
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    first, last = rows[0], rows[-1]
    step(
        "stage 2 done: "
        + ", ".join(
            f"{k} {float(first[k]):.4f} -> {float(last[k]):.4f}" for k in ("distill", "ema", "target_cos", "feat_std")
        )
    )
    return Path(res["backbone"])


def common_cohort(cohort: Path, dirs: list[Path], out: Path) -> Path:
    """Cases whose every slide has features in all `dirs` (a slide without tissue drops its case everywhere)."""
    with cohort.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    bad = {r["case_id"] for r in rows if not all((d / f"{r['slide_id']}.h5").is_file() for d in dirs)}
    keep = [r for r in rows if r["case_id"] not in bad]
    with out.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(keep)
    return out


def downstream(work: Path, cohort: Path, feats: Path, name: str, seed: int, epochs: int) -> dict:
    from training.downstream.cli import run
    from training.downstream.config import DownstreamConfig

    out = {}
    for task in ("classification", "survival"):
        cfg = DownstreamConfig(
            task=task,
            cohort=cohort,
            features_dir=feats,
            aggregator="abmil",
            out_dir=work / "downstream" / f"{name}_{task}_s{seed}",
            epochs=epochs,
            seed=seed,
            n_boot=200,
            max_patches=512,
        )
        m = run(cfg, overwrite=True)  # a bench rerun replaces its run
        out[task] = m
    return {
        "val_auc": out["classification"]["val"]["macro_auc"]["value"],
        "test_auc": out["classification"]["test"]["macro_auc"]["value"],
        "test_auc_ci": (
            out["classification"]["test"]["macro_auc"]["ci_low"],
            out["classification"]["test"]["macro_auc"]["ci_high"],
        ),
        "val_c": out["survival"]["val"]["c_index"]["value"],
        "test_c": out["survival"]["test"]["c_index"]["value"],
        "test_c_ci": (out["survival"]["test"]["c_index"]["ci_low"], out["survival"]["test"]["c_index"]["ci_high"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/mstar_stage2_compare"))
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--cohort-seed", type=int, default=0)
    ap.add_argument("--stage1-epochs", type=int, default=15)
    ap.add_argument("--stage2-steps", type=int, default=80)
    ap.add_argument("--epochs", type=int, default=20, help="ABMIL epochs")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    cohort = make_cohort(work, args.cases, args.cohort_seed)
    stage0 = work / "stage0.pt"
    if not stage0.is_file():
        init_random_stage0(ENCODER, stage0, seed=0)
    f0 = work / "features_stage0"
    features(cohort, stage0, f0)
    teacher = stage1(work, cohort, f0, args.stage1_epochs)
    student = stage2(work, cohort, f0, teacher, stage0, args.stage2_steps)
    f2 = work / "features_stage2"
    features(cohort, student, f2)
    eval_cohort = common_cohort(cohort, [f0, f2], work / "cohort_eval.csv")
    results: dict[str, list[dict]] = {"stage0": [], "stage2": []}
    for seed in args.seeds:
        for name, feats in (("stage0", f0), ("stage2", f2)):
            step(f"ABMIL on {name} features, seed {seed}")
            results[name].append(downstream(work, eval_cohort, feats, name, seed, args.epochs))
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print()
    print(
        f"synthetic cohort: {args.cases} cases; ABMIL {args.epochs} epochs; seeds {args.seeds}; "
        "model selected on val, scored once on test"
    )
    print(
        f"{'features':10s} {'seed':>4s} {'val macro-AUC':>13s} {'test macro-AUC':>14s} {'val C-index':>11s} "
        f"{'test C-index':>12s}"
    )
    for name, rs in results.items():
        for seed, r in zip(args.seeds, rs, strict=True):
            print(
                f"{name:10s} {seed:4d} {r['val_auc']:13.3f} {r['test_auc']:14.3f} {r['val_c']:11.3f} "
                f"{r['test_c']:12.3f}"
            )
        mean = {k: np.mean([r[k] for r in rs]) for k in ("val_auc", "test_auc", "val_c", "test_c")}
        print(
            f"{name:10s} {'mean':>4s} {mean['val_auc']:13.3f} {mean['test_auc']:14.3f} {mean['val_c']:11.3f} "
            f"{mean['test_c']:12.3f}"
        )


if __name__ == "__main__":
    main()
