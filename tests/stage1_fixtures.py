"""Shared builders for the Stage-1 tests: a small feature-level cohort, a tiny BERT and a tiny config."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from training.data.toy_features import make_toy_cohort
from training.models.text_encoder import build_tiny_bert


def write_tiny_setup(root: Path, n_cases: int = 24, **overrides) -> Path:
    """Toy cohort + tiny BERT + a YAML config under `root`; returns the config path."""
    cohort = make_toy_cohort(
        root / "cohort", n_cases=n_cases, n_types=4, feature_dim=16, patches=(10, 40), n_genes=12, seed=1
    )
    texts = [json.loads(line)["text"] for line in (cohort / "reports.jsonl").read_text().splitlines()]
    bert = build_tiny_bert(root / "bert", texts, vocab_size=150, hidden=32, layers=1, heads=2)
    cfg = {
        "data": {"cohort": str(cohort / "cohort.csv"), "features_dir": str(cohort / "features"), "n_patches": 16},
        "model": {
            "aggregator": {"dim": 32, "num_landmarks": 8, "fc_dropout": 0.1, "attn_dropout": 0.1},
            "text": {"model_dir": str(bert), "max_length": 48, "lr": 1e-3},
            "gene": {"dim": 16, "heads": 2, "dim_head": 8},
        },
        "optim": {"epochs": 2, "batch_size": 8, "per_class": 2, "lr": 1e-3},
        "out_dir": str(root / "run"),
        "seed": 3,
        "num_threads": 1,
    }
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = root / "stage1.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
