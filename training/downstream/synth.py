"""Feature-level synthetic cohorts for testing the downstream heads without slides or a patch encoder.

Each case gets a bag of patch features in which a random subset of "tumour" patches carries a class
direction and a risk direction scaled by the case's latent risk; survival times are exponential in that risk
with uniform censoring; reports are templated from class and risk tertile. The layout matches the real
pipeline: `cohort.csv` (case_id, slide_id, split, cancer_type, survival_months, event, has_report),
`reports.jsonl` ({case_id, report}), per-slide `features/<slide_id>.h5` with `features` [N, D] float32 and
`coords` [N, 2] int64, and `truth.json` / `cohort_summary.json` with the latent risk and its C-index (the
ceiling a model can reach).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np

TYPES = {  # the synthetic cohort's cancer types (training.data.synth_tissue.CANCER_TYPES)
    "LUSC": ("squamous cell carcinoma of the lung", "lung squamous cell carcinoma"),
    "COAD": ("colon adenocarcinoma", "adenocarcinoma of the colon"),
    "HNSC": ("head and neck squamous cell carcinoma", "squamous carcinoma of the head and neck"),
    "BRCA": ("invasive ductal carcinoma of the breast", "breast carcinoma"),
}
GRADES = ("low grade", "intermediate grade", "high grade")
EXTRAS = (
    "margins are free of tumor .",
    "lymphovascular invasion is not identified .",
    "lymphovascular invasion is present .",
)


def make_feature_cohort(
    out: str | Path,
    n_cases: int = 120,
    n_classes: int = 3,
    dim: int = 64,
    patches: tuple[int, int] = (24, 64),
    signal: float = 1.5,
    seed: int = 0,
    split_fractions: tuple[float, float] = (0.6, 0.2),
    rna_genes: int = 0,
    rna_share: float = 0.5,
    rna_signal: float = 1.0,
    rna_missing: float = 0.0,
) -> Path:
    """Write a synthetic feature cohort under `out` and return the path of its `cohort.csv`.

    With `rna_genes` > 0 the case's true risk is `sqrt(1 - rna_share) * r_wsi + sqrt(rna_share) * r_rna`: the
    slide carries only `r_wsi`, an RNA matrix `rna.csv` (genes x cases, log1p-like values) carries `r_rna` in a
    tenth of its genes (scaled by `rna_signal`) and the cancer type weakly, and a fraction `rna_missing` of the
    cases has no RNA column. Neither modality alone can then reach the true-risk C-index; fusion can. The RNA
    draws use their own generator, so the slide features of a seed do not change with these options."""
    out = Path(out)
    (out / "features").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    types = list(TYPES)[:n_classes]
    class_dirs = rng.normal(size=(n_classes, dim))
    class_dirs /= np.linalg.norm(class_dirs, axis=1, keepdims=True)
    risk_dir = rng.normal(size=dim)
    risk_dir /= np.linalg.norm(risk_dir)
    rows, reports, truth = [], [], {}
    rna_rng = np.random.default_rng(seed + 7919)
    n_sig = max(rna_genes // 10, 1)
    gene_base = rna_rng.uniform(1.0, 6.0, rna_genes)
    type_genes = rna_rng.normal(0.0, 0.3, (n_classes, rna_genes))
    rna: dict[str, np.ndarray] = {}
    for i in range(n_cases):
        cls = i % n_classes
        risk = float(rng.normal())
        slide_risk = risk
        if rna_genes:
            r_rna = float(rna_rng.normal())
            slide_risk, risk = risk, float(np.sqrt(1 - rna_share) * risk + np.sqrt(rna_share) * r_rna)
            expr = gene_base + type_genes[cls] + rna_rng.normal(0.0, 0.5, rna_genes)
            expr[:n_sig] += rna_signal * 0.5 * r_rna * np.where(np.arange(n_sig) % 2, -1.0, 1.0)
            if rna_rng.random() >= rna_missing:
                rna[f"case-{i:04d}"] = np.clip(expr, 0.0, None)
        n = int(rng.integers(patches[0], patches[1] + 1))
        feats = rng.normal(size=(n, dim))
        tumour = rng.random(n) < 0.3
        tumour[0] = True
        feats[tumour] += signal * 2.0 * class_dirs[cls] + signal * slide_risk * risk_dir
        coords = np.stack([rng.integers(0, 10000, n), rng.integers(0, 10000, n)], axis=1) // 256 * 256
        case_id, slide_id = f"case-{i:04d}", f"slide-{i:04d}"
        with h5py.File(out / "features" / f"{slide_id}.h5", "w") as f:
            f.create_dataset("features", data=feats.astype(np.float32))
            f.create_dataset("coords", data=coords.astype(np.int64))
        t_event = rng.exponential(60.0 * np.exp(-risk))
        t_cens = rng.uniform(10.0, 150.0)
        time, event = min(t_event, t_cens), int(t_event <= t_cens)
        u = rng.random()
        split = "train" if u < split_fractions[0] else "val" if u < sum(split_fractions) else "test"
        grade = GRADES[int(np.digitize(risk, [-0.43, 0.43]))]
        name = TYPES[types[cls]][int(rng.integers(0, 2))]
        report = f"{name} , {grade} . {EXTRAS[int(rng.integers(0, 3))]}"
        rows.append(
            {
                "case_id": case_id,
                "slide_id": slide_id,
                "slide_path": "",
                "cancer_type": types[cls],
                "split": split,
                "survival_months": round(float(time), 3),
                "event": event,
                "has_report": 1,
                "has_rna": int(case_id in rna),
            }
        )
        reports.append({"case_id": case_id, "report": report})
        truth[case_id] = {"risk": risk}
    with open(out / "cohort.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    if rna:
        with open(out / "rna.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["gene", *rna])
            for g in range(rna_genes):
                w.writerow([f"GENE{g:04d}", *(f"{v[g]:.4f}" for v in rna.values())])
    with open(out / "reports.jsonl", "w") as f:
        for r in reports:
            f.write(json.dumps(r) + "\n")
    from training.survival import c_index

    test = [r for r in rows if r["split"] == "test"]
    summary = {
        "true_risk_c_index": c_index(
            np.array([r["event"] for r in rows]),
            np.array([r["survival_months"] for r in rows]),
            np.array([truth[r["case_id"]]["risk"] for r in rows]),
        ),
        "true_risk_c_index_test": c_index(
            np.array([r["event"] for r in test]),
            np.array([r["survival_months"] for r in test]),
            np.array([truth[r["case_id"]]["risk"] for r in test]),
        )
        if any(r["event"] for r in test)
        else None,
        "cancer_types": types,
    }
    (out / "truth.json").write_text(json.dumps(truth))
    (out / "cohort_summary.json").write_text(json.dumps(summary, indent=2))
    return out / "cohort.csv"
