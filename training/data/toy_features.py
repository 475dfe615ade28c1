"""A feature-level toy cohort: structured random patch features, reports and RNA, no pixels.

For tests and quick Stage-1 runs when no slides have been tiled and encoded yet. Each case has a cancer type and
a grade; both leave a trace in every modality (a type-specific and a grade-specific direction in a fraction of the
patch features, words in the report, marker genes in the RNA profile), buried in per-patch noise, so a model has
something real to align but must learn it. The layout is the Stage-1 cohort layout (`training.data.features`).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np

TYPES = ("LUSC", "COAD", "HNSC", "BRCA", "KIRC", "SKCM")
_TYPE_WORDS = {
    "LUSC": "squamous cell carcinoma of the lung with keratinisation",
    "COAD": "adenocarcinoma of the colon with gland formation",
    "HNSC": "squamous carcinoma of the head and neck with lymphocytic infiltrate",
    "BRCA": "invasive ductal carcinoma of the breast among adipose tissue",
    "KIRC": "clear cell renal cell carcinoma with delicate vasculature",
    "SKCM": "malignant melanoma with pigmented epithelioid cells",
}
_GRADE_WORDS = ("well differentiated", "moderately differentiated", "poorly differentiated")
_EXTRAS = ("margins are clear", "margin is involved", "lymphovascular invasion present", "no lymphovascular invasion")


def make_toy_cohort(
    out: str | Path,
    n_cases: int = 60,
    n_types: int = 4,
    feature_dim: int = 32,
    patches: tuple[int, int] = (40, 120),
    n_genes: int = 40,
    signal: float = 1.0,
    val_frac: float = 0.3,
    missing_frac: float = 0.1,
    seed: int = 0,
) -> Path:
    """Write `cohort.csv`, `reports.jsonl`, `rna/expression.csv` and `features/<slide>.h5` under `out`."""
    out = Path(out)
    (out / "features").mkdir(parents=True, exist_ok=True)
    (out / "rna").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    types = TYPES[:n_types]
    type_dir = rng.standard_normal((n_types, feature_dim)).astype(np.float32)
    grade_dir = rng.standard_normal((3, feature_dim)).astype(np.float32)
    type_genes = rng.standard_normal((n_types, n_genes)).astype(np.float32) * 1.5
    grade_genes = rng.standard_normal((3, n_genes)).astype(np.float32)
    rows, reports, expr = [], [], {}
    for i in range(n_cases):
        t = i % n_types
        grade = int(rng.integers(3))
        case = f"TOY-{i:04d}"
        split = "val" if (i // n_types) % round(1 / val_frac) == 0 else "train"
        has_report = rng.random() >= missing_frac
        has_rna = rng.random() >= missing_frac
        n_slides = 2 if rng.random() < 0.15 else 1
        for s in range(n_slides):
            slide = f"{case}-S{s}"
            n = int(rng.integers(patches[0], patches[1] + 1))
            x = rng.standard_normal((n, feature_dim)).astype(np.float32)
            tumour = rng.random(n) < 0.5  # only part of the patches carry the signal
            x[tumour] += signal * (type_dir[t] + 0.7 * grade_dir[grade])
            coords = np.stack(np.divmod(np.arange(n), 16), 1)[:, ::-1].astype(np.int64) * 256
            with h5py.File(out / "features" / f"{slide}.h5", "w") as fh:
                fh.create_dataset("features", data=x)
                fh.create_dataset("coords", data=coords)
            rows.append([case, slide, "", types[t], split, has_report, has_rna])
        if has_report:
            extra = _EXTRAS[int(rng.integers(len(_EXTRAS)))]
            reports.append({"case_id": case, "text": f"{_TYPE_WORDS[types[t]]}, {_GRADE_WORDS[grade]}; {extra}."})
        if has_rna:
            mu = 3.0 + type_genes[t] + 0.7 * grade_genes[grade]
            expr[case] = np.clip(mu + 0.5 * rng.standard_normal(n_genes), 0, None)
    with (out / "cohort.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case_id", "slide_id", "slide_path", "cancer_type", "split", "has_report", "has_rna"])
        w.writerows(rows)
    with (out / "reports.jsonl").open("w") as fh:
        for rec in reports:
            fh.write(json.dumps(rec) + "\n")
    with (out / "rna" / "expression.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        cases = list(expr)
        w.writerow(["gene", *cases])
        for g in range(n_genes):
            w.writerow([f"GENE{g:03d}", *(f"{expr[c][g]:.4f}" for c in cases)])
    return out
