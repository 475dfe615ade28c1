"""The survival task: a discrete-time survival head (NLL over quantile time bins) on a MIL aggregator.

Two documented deviations from the official code (docs/downstream.md, "Survival"): the hazard layer starts at the
training split's marginal hazards, and the kept epoch has the lowest validation NLL.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.errors import InvalidParameterError
from training.cohort import Case, FeatureStore, by_split, load_cohort, require_splits
from training.downstream.common import finish_run
from training.downstream.config import DownstreamConfig
from training.downstream.mil import build_head, fit_mil, output_layer, predict
from training.models.heads import MILHead
from training.survival import (
    assign_bins,
    bootstrap_c_index,
    c_index,
    init_hazard_layer,
    marginal_hazards,
    nll_survival_loss,
    quantile_bin_edges,
)


def train_survival(cfg: DownstreamConfig) -> dict:
    store = FeatureStore(cfg.features_dir)
    cases = load_cohort(cfg.cohort)
    for col in (cfg.time_column, cfg.event_column):
        if cases and col not in cases[0].fields:
            raise InvalidParameterError(f"cohort has no column '{col}'")
    cases = [c for c in cases if np.isfinite(float(c.fields[cfg.time_column]))]
    splits = by_split(cases)
    require_splits(splits)

    def arr(cs: list[Case], col: str) -> np.ndarray:
        return np.array([float(c.fields[col]) for c in cs])

    edges = quantile_bin_edges(
        arr(splits["train"], cfg.time_column), arr(splits["train"], cfg.event_column), cfg.n_bins
    )
    model = build_head(cfg, store.dim(splits["train"][0]), cfg.n_bins, "survival")
    if cfg.survival_init == "marginal":
        train_bins = assign_bins(arr(splits["train"], cfg.time_column), edges)
        hazards = marginal_hazards(train_bins, arr(splits["train"], cfg.event_column), cfg.n_bins)
        init_hazard_layer(output_layer(model), hazards)

    def loss_fn(out: Any, case: Case) -> torch.Tensor:
        y = torch.from_numpy(assign_bins([float(case.fields[cfg.time_column])], edges))
        censored = torch.tensor([1.0 - float(case.fields[cfg.event_column])])
        return nll_survival_loss(out.hazards, out.survival, y, censored)

    def risks(cs: list[Case], m: MILHead) -> tuple[np.ndarray, np.ndarray]:
        outs = predict(m, store, cs)
        return np.array([float(o.risk[0]) for o in outs]), np.stack([o.survival[0].numpy() for o in outs])

    def val_score_of(outs: list[Any]) -> float:
        ev = arr(splits["val"], cfg.event_column)
        if not ev.any():
            return float("nan")
        return c_index(ev, arr(splits["val"], cfg.time_column), np.array([float(o.risk[0]) for o in outs]))

    # the validation NLL, not the C-index, picks the epoch by default: on ~30 validation cases the C-index moves
    # less between epochs than its own bootstrap SD and ignores calibration (docs/downstream.md, "Survival")
    model, history, best_epoch = fit_mil(
        cfg,
        model,
        store,
        splits["train"],
        loss_fn,
        val_score_of,
        splits["val"],
        select_on_loss=cfg.survival_selection == "val_nll",
    )
    result, preds = {"selection": cfg.survival_selection, "init": cfg.survival_init}, {}
    for split in ("val", "test"):
        r, s = risks(splits[split], model)
        ev, t = arr(splits[split], cfg.event_column), arr(splits[split], cfg.time_column)
        result[split] = {"c_index": bootstrap_c_index(ev, t, r, n_boot=cfg.n_boot, seed=cfg.seed)}
        preds[split] = {
            "case_ids": [c.case_id for c in splits[split]],
            "time": t.tolist(),
            "event": ev.astype(int).tolist(),
            "risk": r.tolist(),
            "survival": s.tolist(),
        }
    # outcomes only: `mstar eval` estimates the censoring distribution and the null model for the Brier score
    preds["train"] = {
        "time": arr(splits["train"], cfg.time_column).tolist(),
        "event": arr(splits["train"], cfg.event_column).astype(int).tolist(),
    }
    summary = Path(cfg.cohort).parent / "cohort_summary.json"
    if summary.is_file():
        result["cohort_summary"] = json.loads(summary.read_text())
    meta = {"bin_edges": edges.tolist(), "n_bins": cfg.n_bins, "n_features": model.mil.n_features}
    return finish_run(cfg, model, meta, result, preds, history, best_epoch)
