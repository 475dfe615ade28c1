"""Downstream training: classification, survival and report heads over patch features, plus the
evaluation-only tasks (zero-shot, few-shot, retrieval) that read a Stage-1 checkpoint.

Protocol (mSTAR §3, with its val/test leak fixed): Adam (lr 2e-4, wd 1e-5), cosine schedule over the epochs,
one bag per step; the epoch kept is the best on the **validation** split only (macro-AUC / survival NLL /
BLEU-4), and the test split is scored once with that model. Each run directory holds:
- `head.pt`: {'state_dict', 'meta'} with everything export and serving need (aggregator kind and sizes,
  labels, survival bin edges, vocabulary, config);
- `metrics.json`: val and test metrics with bootstrap CIs and the training history;
- `predictions.json`: per-case test outputs, which `mstar eval` turns into tables and plots.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.errors import InvalidParameterError
from training.downstream_data import Case, FeatureStore, by_split, load_cases, load_reports, require_splits
from training.metrics import caption_metrics, classification_metrics
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

log = logging.getLogger(__name__)

Task = Literal["classification", "survival", "report", "zeroshot", "fewshot", "retrieval"]


class ReportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    d_model: int = 512
    n_memory: int = 64
    encoder_layers: int = 1
    decoder_layers: int = 3
    heads: int = 8
    d_ff: int = 512
    dropout: float = 0.1
    max_len: int = 100
    min_freq: int = 3
    beam: int = 3
    batch_size: int = 8
    lr: float = 1e-4
    # "step": HistGen's StepLR (x gamma every epoch), tuned for ~7k reports per epoch; on a small cohort an
    # epoch is a few steps and it freezes the decoder long before it fits. "cosine" anneals over all epochs.
    schedule: Literal["step", "cosine"] = "step"
    gamma: float = 0.8
    val_beam: int = 1  # greedy on val for model selection speed; beam on test
    meteor: bool = True  # METEOR starts a Java process (slow); BLEU/ROUGE-L always


class DownstreamConfig(BaseModel):
    """A downstream run, read from YAML. Relative paths are relative to the YAML file."""

    model_config = ConfigDict(extra="forbid")
    task: Task
    cohort: Path
    features_dir: Path
    out_dir: Path = Path("runs/downstream")
    reports: Path | None = None
    label_column: str = "cancer_type"
    time_column: str = "survival_months"
    event_column: str = "event"
    aggregator: Literal["abmil", "transmil", "transmil_pre"] = "abmil"
    stage1_checkpoint: Path | None = None
    # Stage-2 checkpoint holding `proj` (1024->512), for patch-level zero-shot
    patch_proj: Path | None = None
    transmil: dict[str, Any] = Field(default_factory=dict)
    dim: int = 512
    dropout: float = 0.25
    epochs: int = 50
    lr: float = 2e-4
    lr_pretrained: float = 2e-5
    weight_decay: float = 1e-5
    max_patches: int | None = 4096  # random subset per training step; evaluation uses every patch
    n_bins: int = 4
    # survival, two documented deviations from the official code (docs/downstream.md): the hazard layer starts at
    # the training split's marginal hazards ("marginal"; official: "random"), and the kept epoch has the lowest
    # validation NLL ("val_nll"; official: the highest validation C-index, "val_c_index")
    survival_init: Literal["marginal", "random"] = "marginal"
    survival_selection: Literal["val_nll", "val_c_index"] = "val_nll"
    n_boot: int = 1000
    seed: int = 1
    report: ReportConfig = Field(default_factory=ReportConfig)
    prompts: Path | None = None
    topk: list[int] = Field(default_factory=lambda: [1, 5, 10, 50, 100])
    shots: list[int] | None = None
    fewshot_repeats: int = 5
    # patch_prototype (official §3.5) needs stage1_checkpoint (+ prompts); skipped without one unless listed here
    fewshot_methods: list[Literal["prototype", "linear_probe", "patch_prototype"]] = Field(
        default_factory=lambda: ["prototype", "linear_probe", "patch_prototype"]
    )
    recall_ks: list[int] = Field(default_factory=lambda: [1, 5, 10])

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> DownstreamConfig:
        path = Path(path)
        if not path.is_file():
            raise InvalidParameterError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise InvalidParameterError(f"config file {path} is not valid YAML: {err}") from err
        if not isinstance(raw, dict):
            raise InvalidParameterError(f"config file {path} must hold a mapping")
        raw.update({k: v for k, v in overrides.items() if v is not None})
        try:
            cfg = cls(**raw)
        except ValidationError as err:
            raise InvalidParameterError(f"invalid downstream config {path}: {err}") from err
        base = path.parent
        for name in (
            "cohort",
            "features_dir",
            "out_dir",
            "reports",
            "stage1_checkpoint",
            "patch_proj",
            "prompts",
        ):
            val = getattr(cfg, name)
            if val is not None and not Path(val).is_absolute():
                setattr(cfg, name, (base / val).resolve())
        return cfg


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _sample(feats: torch.Tensor, max_patches: int | None, gen: torch.Generator) -> torch.Tensor:
    if max_patches is None or feats.shape[0] <= max_patches:
        return feats
    idx = torch.randperm(feats.shape[0], generator=gen)[:max_patches]
    return feats[idx]


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, default=float))


# ---- MIL heads (classification, survival) --------------------------------------------------------
def _build_head(cfg: DownstreamConfig, n_features: int, n_outputs: int, task: str) -> MILHead:
    if cfg.aggregator == "transmil_pre":
        if cfg.stage1_checkpoint is None:
            raise InvalidParameterError("aggregator transmil_pre needs stage1_checkpoint")
        return MILHead.from_stage1(cfg.stage1_checkpoint, n_outputs, task=task, transmil_kwargs=cfg.transmil)
    return MILHead(
        cfg.aggregator,
        n_features,
        n_outputs,
        task=task,
        dim=cfg.dim,
        dropout=cfg.dropout,
        transmil_kwargs=cfg.transmil,
    )


def _output_layer(model: MILHead) -> torch.nn.Linear:
    """The head's last Linear (ABMIL `classifier`, TransMIL `_fc2`): the layer a survival head initialises."""
    return model.mil.classifier if model.kind == "abmil" else model.mil._fc2


@torch.no_grad()
def _predict(model: MILHead, store: FeatureStore, cases: list[Case]) -> list[Any]:
    model.eval()
    return [model(store.case(c)) for c in cases]


@torch.no_grad()
def _mean_loss(model: MILHead, store: FeatureStore, cases: list[Case], loss_fn: Any) -> float:
    if not cases:
        return 0.0
    model.eval()
    return float(np.mean([loss_fn(model(store.case(c)), c).item() for c in cases]))


def _fit_mil(
    cfg: DownstreamConfig,
    model: MILHead,
    store: FeatureStore,
    train: list[Case],
    loss_fn: Any,
    select_fn: Any,
    val: list[Case] | None = None,
    select_on_loss: bool = False,
) -> tuple[MILHead, list[dict], int]:
    """Adam + cosine, one bag per step; keep the epoch with the best `select_fn()` (validation only), or with
    `select_on_loss` the lowest validation loss (`select_fn()` is then only recorded; ties go to the metric).

    Ties in the validation metric (common: a macro-AUC of 1.0 on an easy task) go to the lower validation loss,
    so a barely trained first epoch is not kept just because it ranks perfectly.
    """
    if cfg.epochs < 1:
        raise InvalidParameterError(f"epochs must be >= 1 to train a head, got {cfg.epochs}")
    opt = torch.optim.Adam(model.param_groups(cfg.lr, cfg.lr_pretrained), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.epochs, 1), eta_min=0)
    gen = torch.Generator().manual_seed(cfg.seed)
    best: tuple[float, float] = (-math.inf, -math.inf)
    best_state, best_epoch, history = None, -1, []
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(train), generator=gen).tolist()
        total = 0.0
        for i in order:
            case = train[i]
            out = model(_sample(store.case(case), cfg.max_patches, gen))
            loss = loss_fn(out, case)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        sched.step()
        score = select_fn(model)
        val_loss = _mean_loss(model, store, val or [], loss_fn)
        history.append(
            {"epoch": epoch, "train_loss": total / max(len(train), 1), "val_score": score, "val_loss": val_loss}
        )
        log.info("epoch %d loss %.4f val %.4f (loss %.4f)", epoch, total / max(len(train), 1), score, val_loss)
        metric = score if np.isfinite(score) else -math.inf
        key = (-val_loss, metric) if select_on_loss else (metric, -val_loss)
        if best_state is None or key > best:
            best, best_state, best_epoch = key, copy.deepcopy(model.state_dict()), epoch
    model.load_state_dict(best_state)
    return model, history, best_epoch


def train_classification(cfg: DownstreamConfig) -> dict:
    store = FeatureStore(cfg.features_dir)
    cases = load_cases(cfg.cohort)
    if cases and cfg.label_column not in cases[0].fields:
        raise InvalidParameterError(f"cohort has no label column '{cfg.label_column}'")
    cases = [c for c in cases if isinstance(c.fields.get(cfg.label_column), str) and c.fields[cfg.label_column]]
    splits = by_split(cases)
    require_splits(splits)
    labels = sorted({c.fields[cfg.label_column] for c in splits["train"]})
    if len(labels) < 2:
        raise InvalidParameterError("classification needs at least two classes in the training split")
    lab_idx = {lab: i for i, lab in enumerate(labels)}
    for split in ("val", "test"):
        splits[split] = [c for c in splits[split] if c.fields[cfg.label_column] in lab_idx]
    model = _build_head(cfg, store.dim(splits["train"][0]), len(labels), "classification")

    def y_of(cs: list[Case]) -> np.ndarray:
        return np.array([lab_idx[c.fields[cfg.label_column]] for c in cs])

    def probs_of(cs: list[Case], m: MILHead) -> np.ndarray:
        return np.stack([o.logits.softmax(-1)[0].numpy() for o in _predict(m, store, cs)])

    from training.metrics import macro_auc

    def loss_fn(out: Any, case: Case) -> torch.Tensor:
        target = torch.tensor([lab_idx[case.fields[cfg.label_column]]])
        return torch.nn.functional.cross_entropy(out.logits, target)

    yv = y_of(splits["val"])
    model, history, best_epoch = _fit_mil(
        cfg, model, store, splits["train"], loss_fn, lambda m: macro_auc(yv, probs_of(splits["val"], m)), splits["val"]
    )
    result = {"val": {}, "test": {}}
    preds = {}
    for split in ("val", "test"):
        y, p = y_of(splits[split]), probs_of(splits[split], model)
        result[split] = classification_metrics(y, p, n_boot=cfg.n_boot, seed=cfg.seed)
        preds[split] = {
            "case_ids": [c.case_id for c in splits[split]],
            "y_true": y.tolist(),
            "probs": p.tolist(),
        }
    meta = {"labels": labels, "n_features": model.mil.n_features}
    return _finish(cfg, model, meta, result, preds, history, best_epoch)


def train_survival(cfg: DownstreamConfig) -> dict:
    store = FeatureStore(cfg.features_dir)
    cases = load_cases(cfg.cohort)
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
    model = _build_head(cfg, store.dim(splits["train"][0]), cfg.n_bins, "survival")
    if cfg.survival_init == "marginal":
        train_bins = assign_bins(arr(splits["train"], cfg.time_column), edges)
        hazards = marginal_hazards(train_bins, arr(splits["train"], cfg.event_column), cfg.n_bins)
        init_hazard_layer(_output_layer(model), hazards)

    def loss_fn(out: Any, case: Case) -> torch.Tensor:
        y = torch.from_numpy(assign_bins([float(case.fields[cfg.time_column])], edges))
        censored = torch.tensor([1.0 - float(case.fields[cfg.event_column])])
        return nll_survival_loss(out.hazards, out.survival, y, censored)

    def risks(cs: list[Case], m: MILHead) -> tuple[np.ndarray, np.ndarray]:
        outs = _predict(m, store, cs)
        return np.array([float(o.risk[0]) for o in outs]), np.stack([o.survival[0].numpy() for o in outs])

    def val_score(m: MILHead) -> float:
        ev = arr(splits["val"], cfg.event_column)
        if not ev.any():
            return float("nan")
        return c_index(ev, arr(splits["val"], cfg.time_column), risks(splits["val"], m)[0])

    # the validation NLL, not the C-index, picks the epoch by default: on ~30 validation cases the C-index moves
    # less between epochs than its own bootstrap SD and ignores calibration (docs/downstream.md, "Survival")
    model, history, best_epoch = _fit_mil(
        cfg,
        model,
        store,
        splits["train"],
        loss_fn,
        val_score,
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
    return _finish(cfg, model, meta, result, preds, history, best_epoch)


def _finish(
    cfg: DownstreamConfig,
    model: torch.nn.Module,
    meta: dict,
    result: dict,
    preds: dict,
    history: list[dict],
    best_epoch: int,
) -> dict:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "task": cfg.task,
        "aggregator": cfg.aggregator if cfg.task in ("classification", "survival") else None,
        "config": json.loads(cfg.model_dump_json()),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **meta,
    }
    if isinstance(model, MILHead):
        meta["mil"] = _mil_sizes(model)
    torch.save({"state_dict": model.state_dict(), "meta": meta}, out / "head.pt")
    metrics = {"task": cfg.task, "best_epoch": best_epoch, "history": history, **result}
    _write_json(out / "metrics.json", metrics)
    _write_json(out / "predictions.json", {"task": cfg.task, "meta": _light_meta(meta), **preds})
    return metrics


def _light_meta(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k not in ("config",)}


def _mil_sizes(model: MILHead) -> dict:
    mil = model.mil
    sizes = {
        "kind": model.kind,
        "task": model.task,
        "n_outputs": model.n_outputs,
        "n_features": mil.n_features,
        "dim": mil.dim,
    }
    if model.kind != "abmil":
        layer = mil.layer1.attn
        sizes.update(
            heads=layer.heads,
            num_landmarks=layer.num_landmarks,
            pinv_iterations=layer.pinv_iterations,
            dim_head=int(mil.layer1.attn.to_qkv.weight.shape[0]) // 3 // layer.heads,
        )
    return sizes


TRANSMIL_SIZE_KEYS = ("heads", "num_landmarks", "pinv_iterations", "dim_head")
REPORT_SIZE_KEYS = ("d_model", "n_memory", "encoder_layers", "decoder_layers", "heads", "d_ff", "dropout", "max_len")


def head_export_row(name: str, module: MILHead, meta: dict) -> dict:
    """A saved classification/survival head as `save_export_checkpoint` takes it (sizes, labels or bin edges)."""
    mil = meta["mil"]
    row = {
        "name": name,
        "module": module,
        "task": mil["task"],
        "n_outputs": mil["n_outputs"],
        "dim": mil["dim"],
        "kind": mil["kind"],
    }
    tkw = {k: mil[k] for k in TRANSMIL_SIZE_KEYS if k in mil}
    if tkw:
        row["transmil_kwargs"] = tkw
    if mil["task"] == "classification":
        row["labels"] = meta["labels"]
    else:
        row["bin_edges"] = [float(b) for b in meta["bin_edges"]]
    return row


def load_report_generator(path: str | Path) -> tuple[Any, dict, list[str]]:
    """A saved report head: (ReportGenerator in eval mode, its constructor kwargs, vocabulary itos)."""
    from training.models.report_decoder import ReportGenerator

    ckpt = torch.load(Path(path), map_location="cpu", weights_only=False)
    dec = ckpt["meta"]["decoder"]
    kwargs = {k: dec[k] for k in REPORT_SIZE_KEYS} | {"vocab_size": dec["vocab_size"], "n_features": dec["n_features"]}
    model = ReportGenerator(**kwargs)
    model.load_state_dict(ckpt["state_dict"], strict=True)
    return model.eval(), kwargs, list(ckpt["meta"]["vocabulary"]["itos"])


def load_head(path: str | Path) -> tuple[MILHead, dict]:
    """Rebuild a saved classification/survival head (for export and evaluation)."""
    ckpt = torch.load(Path(path), map_location="cpu", weights_only=False)
    meta = ckpt["meta"]
    sizes = dict(meta["mil"])
    kind = sizes.pop("kind")
    tkw = {k: sizes.pop(k) for k in TRANSMIL_SIZE_KEYS if k in sizes}
    model = MILHead(
        kind,
        sizes["n_features"],
        sizes["n_outputs"],
        task=sizes["task"],
        dim=sizes["dim"],
        transmil_kwargs=tkw or None,
    )
    if "feature_mean" in ckpt["state_dict"]:
        model.set_standardization(ckpt["state_dict"]["feature_mean"], ckpt["state_dict"]["feature_std"])
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model, meta


# ---- report generation ---------------------------------------------------------------------------
def slide_embeddings(store: FeatureStore, cases: list[Case], encoder: Any = None) -> np.ndarray:
    """L2-normalised slide vectors: the Stage-1 aggregator embedding if given, else mean patch features."""
    vecs = []
    with torch.no_grad():
        for c in cases:
            f = store.case(c)
            v = encoder(f.unsqueeze(0)).embedding[0] if encoder is not None else f.mean(0)
            vecs.append(torch.nn.functional.normalize(v.float(), dim=-1).numpy())
    return np.stack(vecs)


def _pad_batch(feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(f.shape[0] for f in feats)
    x = torch.zeros(len(feats), n, feats[0].shape[1])
    mask = torch.ones(len(feats), n, dtype=torch.bool)
    for i, f in enumerate(feats):
        x[i, : f.shape[0]] = f
        mask[i, : f.shape[0]] = False
    return x, mask


def train_report(cfg: DownstreamConfig) -> dict:
    from training.models.report_decoder import ReportGenerator, Vocabulary, normalize

    rc = cfg.report
    store = FeatureStore(cfg.features_dir)
    reports = load_reports(cfg.reports)
    if not reports:
        raise InvalidParameterError("the report task needs `reports` (a JSON-lines file of {case_id, report})")
    cases = [c for c in load_cases(cfg.cohort) if reports.get(c.case_id)]
    splits = by_split(cases)
    require_splits(splits)
    vocab = Vocabulary.build((reports[c.case_id] for c in splits["train"]), rc.min_freq)
    model = ReportGenerator(
        store.dim(splits["train"][0]),
        len(vocab),
        d_model=rc.d_model,
        n_memory=rc.n_memory,
        encoder_layers=rc.encoder_layers,
        decoder_layers=rc.decoder_layers,
        heads=rc.heads,
        d_ff=rc.d_ff,
        dropout=rc.dropout,
        max_len=rc.max_len,
    )
    opt = torch.optim.Adam(model.parameters(), lr=rc.lr, weight_decay=5e-5, amsgrad=True)
    if rc.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.epochs, 1))
    else:
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=rc.gamma)
    gen = torch.Generator().manual_seed(cfg.seed)
    train = splits["train"]
    targets = {c.case_id: torch.tensor(vocab.encode(reports[c.case_id], rc.max_len)) for c in train}

    def generate(cs: list[Case], beam: int) -> list[str]:
        model.eval()
        if beam <= 1:  # batched greedy: one decoder call per position for the whole split
            outs = []
            for i in range(0, len(cs), 32):
                x, mask = _pad_batch([store.case(c) for c in cs[i : i + 32]])
                outs += [vocab.decode(ids) for ids in model.greedy_batch(x, mask)]
            return outs
        return [vocab.decode(model.beam_search(store.case(c), beam=beam)) for c in cs]

    def refs(cs: list[Case]) -> list[str]:
        return [normalize(reports[c.case_id]) for c in cs]

    best, best_state, best_epoch, history = -math.inf, None, -1, []
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(train), generator=gen).tolist()
        total, steps = 0.0, 0
        for b in range(0, len(order), rc.batch_size):
            batch = [train[i] for i in order[b : b + rc.batch_size]]
            x, mask = _pad_batch([_sample(store.case(c), cfg.max_patches, gen) for c in batch])
            toks = torch.nn.utils.rnn.pad_sequence(
                [targets[c.case_id] for c in batch], batch_first=True, padding_value=Vocabulary.PAD
            )
            logits = model(x, toks[:, :-1], mask)
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), toks[:, 1:].reshape(-1), ignore_index=Vocabulary.PAD
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, steps = total + loss.item(), steps + 1
        sched.step()
        val_scores = caption_metrics(refs(splits["val"]), generate(splits["val"], rc.val_beam), meteor=False)
        score = val_scores["BLEU_4"]
        lr_now = opt.param_groups[0]["lr"]
        history.append({"epoch": epoch, "train_loss": total / max(steps, 1), "val_score": score, "lr": lr_now})
        log.info("epoch %d loss %.4f val BLEU-4 %.4f", epoch, total / max(steps, 1), score)
        if score > best or best_state is None:
            best, best_state, best_epoch = score, copy.deepcopy(model.state_dict()), epoch
    model.load_state_dict(best_state)

    # retrieval baseline: the report of the nearest training case by slide embedding
    encoder = _stage1_vision(cfg)
    train_emb = slide_embeddings(store, train, encoder)
    result, preds = {}, {}
    for split in ("val", "test"):
        cs = splits[split]
        hyp = generate(cs, rc.beam)
        nn_idx = (slide_embeddings(store, cs, encoder) @ train_emb.T).argmax(1)
        base = [normalize(reports[train[j].case_id]) for j in nn_idx]
        ref = refs(cs)
        result[split] = {
            "generated": caption_metrics(ref, hyp, meteor=rc.meteor and split == "test"),
            "retrieval_baseline": caption_metrics(ref, base, meteor=rc.meteor and split == "test"),
        }
        preds[split] = {
            "case_ids": [c.case_id for c in cs],
            "reference": ref,
            "generated": hyp,
            "retrieval_baseline": base,
        }
    meta = {
        "vocabulary": vocab.to_dict(),
        "n_features": store.dim(train[0]),
        "decoder": {**rc.model_dump(), "vocab_size": len(vocab), "n_features": store.dim(splits["train"][0])},
        "baseline_embedding": "stage1" if encoder is not None else "mean_patch_features",
    }
    return _finish(cfg, model, meta, result, preds, history, best_epoch)


def _stage1_vision(cfg: DownstreamConfig) -> Any:
    """The frozen Stage-1 aggregator, or None without a checkpoint."""
    if cfg.stage1_checkpoint is None:
        return None
    from training.models.heads import load_stage1_vision

    return load_stage1_vision(cfg.stage1_checkpoint)


# ---- dispatch ------------------------------------------------------------------------------------
def run(cfg: DownstreamConfig) -> dict:
    seed_everything(cfg.seed)
    if cfg.task == "classification":
        return train_classification(cfg)
    if cfg.task == "survival":
        return train_survival(cfg)
    if cfg.task == "report":
        return train_report(cfg)
    if cfg.task == "zeroshot":
        from training.zeroshot import run_zeroshot

        return run_zeroshot(cfg)
    if cfg.task == "fewshot":
        from training.fewshot import run_fewshot

        return run_fewshot(cfg)
    if cfg.task == "retrieval":
        from training.retrieval import run_retrieval

        return run_retrieval(cfg)
    raise InvalidParameterError(f"unknown task {cfg.task}")
