"""What every downstream task shares: seeding, bag sampling, the Stage-1 aggregator, slide embeddings, and
`finish_run`, which writes a run's `head.pt`, `metrics.json` and `predictions.json`.

Run directory (every task):
- `head.pt`: the trained model (`training.checkpoints.save_head`: format, model config, weights, and a `meta` with
  what export and serving need: labels, survival bin edges, vocabulary, the run config);
- `metrics.json`: val and test metrics with bootstrap CIs and the training history;
- `predictions.json`: per-case test outputs, which `mstar eval` turns into tables and plots.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.atomic import atomic_path
from training.checkpoints import load_stage1_vision, mil_sizes, run_meta, save_head
from training.cohort import Case, FeatureStore
from training.downstream.config import DownstreamConfig
from training.models.heads import MILHead
from training.repro import seed_everything

__all__ = ["seed_everything"]


def sample_bag(feats: torch.Tensor, max_patches: int | None, gen: torch.Generator) -> torch.Tensor:
    """A random subset of at most `max_patches` rows (training steps; evaluation uses every patch)."""
    if max_patches is None or feats.shape[0] <= max_patches:
        return feats
    idx = torch.randperm(feats.shape[0], generator=gen)[:max_patches]
    return feats[idx]


def write_json(path: Path, obj: Any) -> None:
    """Replaced whole or not at all (a full disk mid-write keeps the previous file)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=float))


def stage1_vision(cfg: DownstreamConfig) -> Any:
    """The frozen Stage-1 aggregator of `cfg.stage1_checkpoint`, or None without one."""
    if cfg.stage1_checkpoint is None:
        return None
    return load_stage1_vision(cfg.stage1_checkpoint)


def slide_embeddings(store: FeatureStore, cases: list[Case], encoder: Any = None) -> np.ndarray:
    """L2-normalised slide vectors: the Stage-1 aggregator embedding if given, else mean patch features."""
    vecs = []
    with torch.no_grad():
        for c in cases:
            f = store.case(c)
            v = encoder(f.unsqueeze(0)).embedding[0] if encoder is not None else f.mean(0)
            vecs.append(torch.nn.functional.normalize(v.float(), dim=-1).numpy())
    return np.stack(vecs)


def finish_run(
    cfg: DownstreamConfig,
    model: torch.nn.Module | None,
    meta: dict,
    result: dict,
    preds: dict,
    history: list[dict],
    best_epoch: int,
) -> dict:
    """Write the run directory (see the module docstring) and return the metrics. `model` None: an
    evaluation-only task, whose `head.pt` holds no weights."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = run_meta(
        cfg.task,
        cfg.aggregator if cfg.task in ("classification", "survival") else None,
        json.loads(cfg.model_dump_json()),
        **meta,
    )
    if isinstance(model, MILHead):
        meta["mil"] = mil_sizes(model)
    if model is not None and hasattr(model, "config"):
        save_head(out / "head.pt", model, meta)
    else:
        state = model.state_dict() if model is not None else {}
        with atomic_path(out / "head.pt") as tmp:
            torch.save({"state_dict": state, "meta": meta}, tmp)
    metrics = {"task": cfg.task, "best_epoch": best_epoch, "history": history, **result}
    write_json(out / "metrics.json", metrics)
    light = {k: v for k, v in meta.items() if k != "config"}
    write_json(out / "predictions.json", {"task": cfg.task, "meta": light, **preds})
    return metrics
