"""Slide vs RNA vs fused survival on synthetic cohorts, side by side in one run (issue 18; docs/downstream.md).

Run: `.venv/bin/python bench/multimodal_survival.py [--seeds 101 202 303] [--cases 160] [--epochs 12]`

Each seed writes a feature-level cohort (`make_feature_cohort` with an RNA matrix) whose true risk is half slide,
half RNA (`rna_share`), with 15% of cases lacking RNA; then trains three heads on the same complete cases and
splits: WSI only (ABMIL branch), RNA only (SNN branch) and one fused head per `--fusion` design (default Porpoise
gated concat and MCAT co-attention over gene groups), and prints test C-index with its bootstrap 95% CI next to the
true-risk C-index of the same test cases (the ceiling).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # before bench/: bench/service.py must not shadow the package

from training.downstream.cli import run  # noqa: E402
from training.downstream.config import DownstreamConfig  # noqa: E402
from training.downstream.synth import make_feature_cohort  # noqa: E402

UNIMODAL = {"wsi": ["wsi"], "rna": ["rna"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[101, 202, 303])
    ap.add_argument("--cases", type=int, default=160)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--rna-share", type=float, default=0.5)
    ap.add_argument("--fusion", nargs="+", default=["gated_concat", "mcat"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            root = Path(tmp) / str(seed)
            csv = make_feature_cohort(
                root,
                n_cases=args.cases,
                dim=32,
                patches=(16, 48),
                seed=seed,
                rna_genes=100,
                rna_share=args.rna_share,
                rna_missing=0.15,
            )
            row = {"seed": seed}
            arms = [(a, m, "gated_concat") for a, m in UNIMODAL.items()]
            arms += [(f"fused {f}", ["wsi", "rna"], f) for f in args.fusion]
            for arm, mods, fusion in arms:
                cfg = DownstreamConfig(
                    task="survival",
                    cohort=csv,
                    features_dir=root / "features",
                    out_dir=root / arm.replace(" ", "_"),
                    rna=root / "rna.csv",
                    modalities=mods,
                    epochs=args.epochs,
                    dim=32,
                    lr=1e-3,
                    n_boot=500,
                    seed=seed,
                    fusion=fusion,
                )
                m = run(cfg, overwrite=True)  # a bench rerun replaces its run
                ci = m["test"]["c_index"]
                row[arm] = f"{ci['value']:.3f} [{ci['ci_low']:.3f}, {ci['ci_high']:.3f}]"
                row["true"] = round(m["true_risk_c_index_test_cases"], 3)
                row["n_test"], row["n_excluded"] = ci["n"], m["n_excluded_no_rna"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    fused = [f"fused {f}" for f in args.fusion]
    print("| seed | n test | left out (no RNA) | WSI only | RNA only | " + " | ".join(fused) + " | true risk |")
    print("| --- " * (6 + len(fused)) + "|")
    for r in rows:
        cells = [r[k] for k in ("seed", "n_test", "n_excluded", "wsi", "rna", *fused, "true")]
        print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
