"""A model bundle with a slide + RNA head (`rna_fusion`) for the service tests: the tiny bundle of
`inference_fixtures` plus a fusion head trained for one epoch on a synthetic cohort whose patch features have the
tiny encoder's width, exported to ONNX by `training.export.fusion.add_to_bundle` (parity-checked there)."""

from __future__ import annotations

import fcntl
import json
import shutil
from pathlib import Path

import yaml


def build_fusion_bundle(root: Path) -> Path:
    """`root/bundle-rna` (built once per session, under a file lock); its gene list is `rna_genes.json`."""
    from inference_fixtures import build_tiny_bundle

    from service.inference.bundle import load_bundle
    from training.downstream.cli import run
    from training.downstream.config import DownstreamConfig
    from training.downstream.synth import make_feature_cohort
    from training.export.fusion import add_to_bundle

    out = root / "bundle-rna"
    with open(root / ".fusion_bundle.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "bundle.json").is_file() and load_bundle(out).manifest.rna_fusion is not None:
            return out
        tiny = build_tiny_bundle(root)
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(tiny, out)
        dim = load_bundle(out).manifest.embed_dim
        cohort = root / "fusion-cohort"
        make_feature_cohort(cohort, n_cases=40, n_classes=2, dim=dim, patches=(8, 16), seed=3, rna_genes=20)
        cfg = {
            "task": "survival",
            "cohort": str(cohort / "cohort.csv"),
            "features_dir": str(cohort / "features"),
            "rna": str(cohort / "rna.csv"),
            "modalities": ["wsi", "rna"],
            "dim": 16,
            "n_boot": 5,
            "epochs": 1,
        }
        (cohort / "c.yaml").write_text(yaml.safe_dump(cfg))
        run(DownstreamConfig.from_yaml(cohort / "c.yaml", out_dir=str(cohort / "run")))
        add_to_bundle(cohort / "run" / "head.pt", out)
    return out


def fusion_genes(bundle_dir: Path) -> list[str]:
    return list(json.loads((bundle_dir / "bundle.json").read_text())["rna_fusion"]["genes"])
