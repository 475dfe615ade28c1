"""Slide + RNA-Seq downstream tasks (survival, classification) with a Porpoise-style fusion head
(`training.models.fusion`), and the unimodal baselines on the same cases (`modalities: [wsi]` or `[rna]`).

Missing RNA is handled as Porpoise, MCAT and mSTAR's multimodal survival evaluation do: **complete cases only**.
A case without an RNA profile (or whose profile covers too few of the model's genes) is left out of every split,
and the run records how many were left out; the WSI-only baseline run with the same `rna` file sees exactly the
same cases, so the comparison is paired. Splits, selection (validation only) and bootstrap CIs are the unimodal
tasks' own (`fit_mil`, `bootstrap_c_index`, `classification_metrics`).

RNA preprocessing, fitted on the training split only and stored in `head.pt`'s meta for serving: the gene list
(the Stage-1 checkpoint's with `rna_encoder: stage1`; otherwise the genes measured in at least half of the
training cases), per-gene mean and SD; a missing gene takes the training mean (0 after standardisation).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.errors import InvalidParameterError
from service.inference.rna_input import impute, map_profile, read_matrix, read_profile
from training.checkpoints import load_stage1_gene
from training.cohort import Case, FeatureStore, by_split, load_cohort, require_splits
from training.downstream.common import finish_run
from training.downstream.config import DownstreamConfig
from training.downstream.mil import class_probs, fit_mil
from training.metrics import classification_metrics, macro_auc
from training.models.fusion import FusionHead, StageOneRNA
from training.survival import (
    assign_bins,
    bootstrap_c_index,
    c_index,
    marginal_hazards,
    nll_survival_loss,
    quantile_bin_edges,
)

log = logging.getLogger(__name__)
PROFILE_SUFFIXES = (".csv", ".tsv", ".txt")


def is_multimodal(cfg: DownstreamConfig) -> bool:
    return cfg.task in ("classification", "survival") and ("rna" in cfg.modalities or cfg.rna is not None)


def load_rna(path: Path, case_ids: set[str]) -> dict[str, dict[str, float]]:
    """{case_id: {gene: value}} from a cohort matrix, or a folder of per-case profiles `<case_id>.<ext>` (files
    of other names, such as a matrix kept beside them, are not read)."""
    if path.is_dir():
        return {
            p.stem: read_profile(p)
            for p in sorted(path.iterdir())
            if p.suffix.lower() in PROFILE_SUFFIXES and p.stem in case_ids
        }
    if not path.is_file():
        raise InvalidParameterError(f"RNA file {path} does not exist")
    return read_matrix(path)


def choose_genes(train_profiles: list[dict[str, float]]) -> list[str]:
    """Genes measured in at least half of the training profiles, in first-seen order."""
    counts: dict[str, int] = {}
    for prof in train_profiles:
        for g in prof:
            counts[g] = counts.get(g, 0) + 1
    genes = [g for g, n in counts.items() if n * 2 >= len(train_profiles)]
    if not genes:
        raise InvalidParameterError("no gene is measured in half of the training cases")
    return genes


class RNATable:
    """The cohort's profiles on the model's gene list, imputed, with the training statistics for serving."""

    def __init__(self, cfg: DownstreamConfig, cases: list[Case]) -> None:
        profiles = load_rna(Path(cfg.rna), {c.case_id for c in cases}) if cfg.rna is not None else {}
        self.stage1 = load_stage1_gene(cfg.stage1_checkpoint) if cfg.rna_encoder == "stage1" else None
        if cfg.rna_encoder == "stage1" and cfg.stage1_checkpoint is None:
            raise InvalidParameterError("rna_encoder stage1 needs stage1_checkpoint")
        train = [profiles[c.case_id] for c in cases if c.split == "train" and c.case_id in profiles]
        if not train:
            raise InvalidParameterError("no training case has an RNA profile")
        self.genes = self.stage1.genes if self.stage1 is not None else choose_genes(train)
        raw: dict[str, np.ndarray] = {}
        self.unknown: set[str] = set()
        self.too_sparse = 0
        for c in cases:
            if c.case_id not in profiles:
                continue
            try:
                mapped = map_profile(profiles[c.case_id], self.genes, cfg.rna_min_coverage)
            except InvalidParameterError:
                self.too_sparse += 1
                continue
            raw[c.case_id] = mapped.values
            self.unknown.update(mapped.unknown)
        tr = np.stack([raw[c.case_id] for c in cases if c.split == "train" and c.case_id in raw])
        self.mean = np.nan_to_num(np.nanmean(tr, axis=0)).astype(np.float32)
        self.std = np.nan_to_num(np.nanstd(tr, axis=0), nan=1.0).clip(1e-3).astype(np.float32)
        self.values = {k: impute(v, self.mean) for k, v in raw.items()}
        self.standardise = self.stage1 is None

    def tensor(self, case_id: str) -> torch.Tensor:
        v = self.values[case_id]
        if self.standardise:
            v = (v - self.mean) / self.std
        return torch.from_numpy(v).unsqueeze(0)

    def meta(self) -> dict[str, Any]:
        return {
            "genes": self.genes,
            "rna_mean": self.mean.tolist(),
            "rna_std": self.std.tolist(),
            "rna_standardise": self.standardise,
            "rna_bin_edges": self.stage1.edges.tolist() if self.stage1 is not None else None,
        }


def _prepare(cfg: DownstreamConfig, keep: Any) -> tuple[FeatureStore, dict[str, list[Case]], RNATable, dict]:
    store = FeatureStore(cfg.features_dir)
    cases = load_cohort(cfg.cohort)
    needed = (cfg.time_column, cfg.event_column) if cfg.task == "survival" else (cfg.label_column,)
    for col in needed:
        if cases and col not in cases[0].fields:
            raise InvalidParameterError(f"cohort has no column '{col}'")
    cases = [c for c in cases if keep(c)]
    rna = RNATable(cfg, cases)
    complete = [c for c in cases if c.case_id in rna.values]
    info = {
        "modalities": list(cfg.modalities),
        "fusion": cfg.fusion,
        "rna_encoder": cfg.rna_encoder,
        "missing_rna": "complete cases (Porpoise/MCAT): cases without RNA are left out of every split",
        "n_cases": len(complete),
        "n_excluded_no_rna": len(cases) - len(complete) - rna.too_sparse,
        "n_excluded_sparse_rna": rna.too_sparse,
        "n_genes": len(rna.genes),
        "n_unknown_genes": len(rna.unknown),
    }
    log.info("multimodal: %d complete cases, %d left out without RNA", len(complete), len(cases) - len(complete))
    splits = by_split(complete)
    require_splits(splits)
    return store, splits, rna, info


def _model(cfg: DownstreamConfig, store: FeatureStore, first: Case, rna: RNATable, n_out: int, task: str) -> Any:
    branch = None
    if rna.stage1 is not None and "rna" in cfg.modalities:
        branch = StageOneRNA(rna.stage1.encoder, rna.stage1.proj, torch.from_numpy(rna.stage1.edges), cfg.dim)
    return FusionHead(
        tuple(cfg.modalities),
        store.dim(first),
        len(rna.genes),
        n_out,
        task=task,  # type: ignore[arg-type]
        dim=cfg.dim,
        dropout=cfg.dropout,
        fusion=cfg.fusion,
        rna_branch=branch,
        n_groups=cfg.mcat_groups,
        groups=read_signatures(cfg.mcat_signatures, rna.genes) if cfg.mcat_signatures is not None else None,
    )


def read_signatures(path: Path, genes: list[str]) -> list[list[int]]:
    """MCAT's `signatures.csv` (one column per group: header the group name, cells its genes, blank cells
    allowed) -> each group's indices in `genes`, the head's gene list. A group none of whose genes is in the list
    is dropped (logged); no group left is an error, since the co-attention would have no queries."""
    import csv

    from service.inference.rna_input import normalize_gene_id

    if not Path(path).is_file():
        raise InvalidParameterError(f"mcat_signatures {path} does not exist")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    if not rows or not any(h.strip() for h in rows[0]):
        raise InvalidParameterError(f"mcat_signatures {path}: needs a header row of group names")
    index = {normalize_gene_id(g): i for i, g in enumerate(genes)}
    groups: list[list[int]] = []
    for col, name in enumerate(rows[0]):
        cells = [r[col].strip() for r in rows[1:] if col < len(r) and r[col].strip()]
        idx = sorted({index[g] for g in map(normalize_gene_id, cells) if g in index})
        if idx:
            groups.append(idx)
        else:
            log.warning("mcat_signatures: group %r has none of the head's %d genes; left out", name, len(genes))
    if not groups:
        raise InvalidParameterError(
            f"mcat_signatures {path}: no group names a gene of the head's gene list ({len(genes)} genes)"
        )
    return groups


def _forward(rna: RNATable) -> Any:
    def fwd(model: FusionHead, bag: torch.Tensor, case: Case) -> Any:
        return model(bag, rna.tensor(case.case_id))

    return fwd


@torch.no_grad()
def _predict(model: FusionHead, store: FeatureStore, rna: RNATable, cases: list[Case]) -> list[Any]:
    model.eval()
    return [model(store.case(c) if "wsi" in model.modalities else None, rna.tensor(c.case_id)) for c in cases]


def _contributions(outs: list[Any]) -> dict[str, list[float]]:
    """Per-modality logit contributions (gated_concat), summed over the outputs, per case."""
    if not outs or not getattr(outs[0], "contributions", None):
        return {}
    return {m: [float(o.contributions[m].sum()) for o in outs] for m in outs[0].contributions}


def train_multimodal_survival(cfg: DownstreamConfig) -> dict:
    store, splits, rna, info = _prepare(
        cfg, lambda c: np.isfinite(float(c.fields.get(cfg.time_column, "nan") or "nan"))
    )

    def arr(cs: list[Case], col: str) -> np.ndarray:
        return np.array([float(c.fields[col]) for c in cs])

    tr = splits["train"]
    edges = quantile_bin_edges(arr(tr, cfg.time_column), arr(tr, cfg.event_column), cfg.n_bins)
    model = _model(cfg, store, tr[0], rna, cfg.n_bins, "survival")
    if cfg.survival_init == "marginal":
        hz = marginal_hazards(assign_bins(arr(tr, cfg.time_column), edges), arr(tr, cfg.event_column), cfg.n_bins)
        model.init_output(torch.logit(torch.as_tensor(hz, dtype=torch.float32)))

    def loss_fn(out: Any, case: Case) -> torch.Tensor:
        y = torch.from_numpy(assign_bins([float(case.fields[cfg.time_column])], edges))
        censored = torch.tensor([1.0 - float(case.fields[cfg.event_column])])
        return nll_survival_loss(out.hazards, out.survival, y, censored)

    def val_score(outs: list[Any]) -> float:
        ev = arr(splits["val"], cfg.event_column)
        if not ev.any():
            return float("nan")
        return c_index(ev, arr(splits["val"], cfg.time_column), np.array([float(o.risk[0]) for o in outs]))

    model, history, best_epoch = fit_mil(
        cfg,
        model,
        store,
        tr,
        loss_fn,
        val_score,
        splits["val"],
        select_on_loss=cfg.survival_selection == "val_nll",
        forward=_forward(rna),
    )
    result: dict[str, Any] = {"selection": cfg.survival_selection, "init": cfg.survival_init, **info}
    preds: dict[str, Any] = {}
    for split in ("val", "test"):
        outs = _predict(model, store, rna, splits[split])
        r = np.array([float(o.risk[0]) for o in outs])
        ev, t = arr(splits[split], cfg.event_column), arr(splits[split], cfg.time_column)
        result[split] = {"c_index": bootstrap_c_index(ev, t, r, n_boot=cfg.n_boot, seed=cfg.seed)}
        preds[split] = {
            "case_ids": [c.case_id for c in splits[split]],
            "time": t.tolist(),
            "event": ev.astype(int).tolist(),
            "risk": r.tolist(),
            "survival": [o.survival[0].tolist() for o in outs],
            "contributions": _contributions(outs),
        }
        if split == "test":  # the cohort's ceiling on exactly these cases, when the cohort records a true risk
            truth = Path(cfg.cohort).parent / "truth.json"
            if truth.is_file() and ev.any():
                tr_risk = json.loads(truth.read_text())
                true = np.array([tr_risk[c.case_id]["risk"] for c in splits[split]])
                result["true_risk_c_index_test_cases"] = c_index(ev, t, true)
    preds["train"] = {
        "time": arr(tr, cfg.time_column).tolist(),
        "event": arr(tr, cfg.event_column).astype(int).tolist(),
    }
    meta = {"bin_edges": edges.tolist(), "n_bins": cfg.n_bins, "fusion_config": model.config, **rna.meta()}
    return finish_run(cfg, model, meta, result, preds, history, best_epoch)


def train_multimodal_classification(cfg: DownstreamConfig) -> dict:
    col = cfg.label_column
    store, splits, rna, info = _prepare(cfg, lambda c: isinstance(c.fields.get(col), str) and bool(c.fields[col]))
    labels = sorted({c.fields[col] for c in splits["train"]})
    if len(labels) < 2:
        raise InvalidParameterError("classification needs at least two classes in the training split")
    idx = {lab: i for i, lab in enumerate(labels)}
    for split in ("val", "test"):
        splits[split] = [c for c in splits[split] if c.fields[col] in idx]
    model = _model(cfg, store, splits["train"][0], rna, len(labels), "classification")

    def y_of(cs: list[Case]) -> np.ndarray:
        return np.array([idx[c.fields[col]] for c in cs])

    def probs_of(cs: list[Case], m: FusionHead) -> np.ndarray:
        return class_probs(_predict(m, store, rna, cs))

    def loss_fn(out: Any, case: Case) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(out.logits, torch.tensor([idx[case.fields[col]]]))

    yv = y_of(splits["val"])
    model, history, best_epoch = fit_mil(
        cfg,
        model,
        store,
        splits["train"],
        loss_fn,
        lambda outs: macro_auc(yv, class_probs(outs)),
        splits["val"],
        forward=_forward(rna),
    )
    result: dict[str, Any] = dict(info)
    preds: dict[str, Any] = {}
    for split in ("val", "test"):
        y, p = y_of(splits[split]), probs_of(splits[split], model)
        result[split] = classification_metrics(y, p, n_boot=cfg.n_boot, seed=cfg.seed)
        preds[split] = {"case_ids": [c.case_id for c in splits[split]], "y_true": y.tolist(), "probs": p.tolist()}
    meta = {"labels": labels, "fusion_config": model.config, **rna.meta()}
    return finish_run(cfg, model, meta, result, preds, history, best_epoch)
