"""Checkpoint formats of training: what a Stage-1 run and a downstream head leave on disk, and how they load.

Every model records the constructor arguments it was built with (`model.config`); a checkpoint stores them next
to the weights, so loading rebuilds the model from the record and loads the weights strictly. Sizes are never
inferred from weight shapes.

- Stage 1 (`training.stage1` writes `last.pt`): `{"format": STAGE1_FORMAT, "aggregator_config": TransMIL config,
  "model_state_dict", "config": the Stage1Config, "n_features", "feature_mean", "feature_std", "text_model_dir",
  "label_names", "genes", ...}` plus optimiser/scheduler/RNG state for resuming.
- A downstream head (`head.pt`): `{"format": HEAD_FORMAT, "model": "mil" | "report", "config": model config,
  "state_dict", "meta"}`.

Files written before the formats were named still load (`tests/data/legacy_checkpoints/`): a Stage-1 checkpoint
without `aggregator_config` takes its aggregator from its own training config (`config.model.aggregator`,
`n_features`), with the official mSTAR sizes for whatever it does not record (a released checkpoint records
nothing); a head without `format` takes its sizes from the `meta` it was saved with.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from service.atomic import atomic_path
from service.errors import InvalidParameterError
from training.models.heads import MILHead
from training.models.mstar import Stage1Encoders, Stage1Vision
from training.models.report_arch import SIZE_KEYS, build_report_model
from training.models.report_decoder import ReportModel
from training.models.transmil import TransMIL

STAGE1_FORMAT = "mstar-stage1/2"
HEAD_FORMAT = "mstar-head/2"
# the official mSTAR/TransMIL aggregator (reference §1.2): what a checkpoint that records no size was built with
OFFICIAL_AGGREGATOR: dict[str, Any] = {
    "n_features": 1024,
    "dim": 512,
    "n_classes": 0,
    "heads": 8,
    "dim_head": None,
    "num_landmarks": None,
    "pinv_iterations": 6,
    "fc_dropout": 0.25,
    "attn_dropout": 0.1,
}
_AGGREGATOR_CONFIG_KEYS = ("dim", "heads", "dim_head", "num_landmarks", "pinv_iterations", "fc_dropout", "attn_dropout")
_TRANSMIL_SIZE_KEYS = ("heads", "num_landmarks", "pinv_iterations", "dim_head")


def _load(path: str | Path, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise InvalidParameterError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types on a truncated or foreign file
        raise InvalidParameterError(f"cannot read {what} {path}: {err}") from err


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


# ---- Stage 1 -------------------------------------------------------------------------------------
def stage1_record(model: nn.Module) -> dict[str, Any]:
    """The fields a Stage-1 checkpoint adds to its weights so that it loads without inferring sizes."""
    return {"format": STAGE1_FORMAT, "aggregator_config": dict(model.vision_encoder.config)}


def save_stage1(path: str | Path, model: nn.Module, **records: Any) -> Path:
    """Write Stage-1 weights with their records (`records`: config, n_features, feature_mean/std, text_model_dir,
    ...); `training.stage1` adds its optimiser state the same way for resuming."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**stage1_record(model), "model_state_dict": model.state_dict(), **records}, path)
    return path


@dataclass
class Stage1Checkpoint:
    """A Stage-1 checkpoint read back: the model's state (DDP `module.` stripped) and what it records."""

    path: Path
    state: dict[str, torch.Tensor]
    config: dict[str, Any]
    aggregator_config: dict[str, Any]
    feature_mean: torch.Tensor | None
    feature_std: torch.Tensor | None
    text_model_dir: str | None

    def part(self, prefix: str) -> dict[str, torch.Tensor]:
        return _strip(self.state, prefix)


def _legacy_aggregator_config(ckpt: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint without `aggregator_config`: its training config's aggregator, the official sizes elsewhere."""
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    agg = (config.get("model") or {}).get("aggregator") or {}
    out = dict(OFFICIAL_AGGREGATOR)
    out.update({k: agg[k] for k in _AGGREGATOR_CONFIG_KEYS if agg.get(k) is not None})
    if ckpt.get("n_features") is not None:
        out["n_features"] = int(ckpt["n_features"])
    return out


def read_stage1(path: str | Path) -> Stage1Checkpoint:
    """Read a Stage-1 checkpoint (ours: `model_state_dict` + records; the official layout; or a bare state dict)."""
    ckpt = _load(path, "Stage-1 checkpoint")
    state = ckpt.get("model_state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise InvalidParameterError(f"{path} is not a state dict checkpoint")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if not any(k.startswith("vision_encoder.") for k in state):
        raise InvalidParameterError(f"{path} holds no Stage-1 aggregator ('vision_encoder.*' weights)")
    meta = ckpt if "model_state_dict" in ckpt else {}
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    if isinstance(meta.get("aggregator_config"), dict):
        agg = dict(meta["aggregator_config"])
    else:
        agg = _legacy_aggregator_config(meta)

    def tensor(key: str) -> torch.Tensor | None:
        val = meta.get(key)
        return None if val is None else torch.as_tensor(np.asarray(val), dtype=torch.float32)

    return Stage1Checkpoint(
        Path(path),
        state,
        dict(config),
        agg,
        tensor("feature_mean"),
        tensor("feature_std"),
        meta.get("text_model_dir"),
    )


def build_stage1_aggregator(ckpt: Stage1Checkpoint, **overrides: Any) -> TransMIL:
    """The checkpoint's TransMIL, built from its recorded config and loaded strictly (`_fc2` only if stored)."""
    config = {**ckpt.aggregator_config, **{k: v for k, v in overrides.items() if v is not None}}
    model = TransMIL(**config)
    try:
        model.load_state_dict(ckpt.part("vision_encoder."), strict=True)
    except RuntimeError as err:
        raise InvalidParameterError(
            f"Stage-1 aggregator in {ckpt.path} does not match its recorded config {config}: {err}"
        ) from err
    return model


def load_stage1_vision(path: str | Path) -> Stage1Vision:
    """The frozen Stage-1 aggregator plus the feature standardisation it was trained with, in eval mode."""
    ckpt = read_stage1(path)
    return Stage1Vision(build_stage1_aggregator(ckpt), ckpt.feature_mean, ckpt.feature_std).eval()


def load_stage1(path: str | Path, with_text: bool = True, text_model_dir: str | Path | None = None) -> Stage1Encoders:
    """The Stage-1 towers used after pretraining: aggregator (+ standardisation), text encoder and `proj_text`.

    `text_model_dir` names the text model's config/tokenizer for checkpoints that record none (the official
    layout: a BioBERT directory)."""
    from training.models.text_encoder import TextEncoder  # transformers: only when a text tower is wanted

    ckpt = read_stage1(path)
    vision = Stage1Vision(build_stage1_aggregator(ckpt), ckpt.feature_mean, ckpt.feature_std)
    text = proj = None
    tstate, pstate = ckpt.part("text_encoder."), ckpt.part("proj_text.")
    if with_text and tstate and pstate:
        text_cfg = (ckpt.config.get("model") or {}).get("text") or {}
        text_dir = text_model_dir or ckpt.text_model_dir or text_cfg.get("model_dir")
        text = TextEncoder(text_dir, text_cfg.get("max_length", 512))
        # the official text tower is a masked-LM model: its MLM head (`text_encoder.cls.*`) is saved but unused
        tstate = {k: v for k, v in tstate.items() if not k.startswith("cls.")}
        missing, unexpected = text.load_state_dict(tstate, strict=False)
        if unexpected or missing:
            raise InvalidParameterError(
                f"text encoder weights do not match {text_dir}: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        # built as MStar builds it: text width -> the aggregator's width
        proj = nn.Linear(text.hidden_size, int(ckpt.aggregator_config["dim"]))
        try:
            proj.load_state_dict(pstate)
        except RuntimeError as err:
            raise InvalidParameterError(f"proj_text in {path} does not match the text encoder: {err}") from err
    return Stage1Encoders(vision, text, proj).eval()


def head_from_stage1(
    checkpoint: str | Path,
    n_outputs: int,
    task: str = "classification",
    transmil_kwargs: dict[str, Any] | None = None,
) -> MILHead:
    """TransMIL_Pre: a TransMIL head whose every weight but `_fc2` comes from the Stage-1 `vision_encoder`."""
    ckpt = read_stage1(checkpoint)
    kw = {k: ckpt.aggregator_config[k] for k in (*_TRANSMIL_SIZE_KEYS, "n_features", "dim")}
    kw.update(transmil_kwargs or {})
    n_features, dim = kw.pop("n_features"), kw.pop("dim")
    head = MILHead("transmil_pre", n_features, n_outputs, task=task, dim=dim, transmil_kwargs=kw)  # type: ignore[arg-type]
    if ckpt.feature_mean is not None:
        head.set_standardization(ckpt.feature_mean, ckpt.feature_std)
    try:
        missing, unexpected = head.mil.load_state_dict(ckpt.part("vision_encoder."), strict=False)
    except RuntimeError as err:  # shapes that disagree with the recorded config
        raise InvalidParameterError(
            f"Stage-1 aggregator in {checkpoint} does not match its recorded config: {err}"
        ) from err
    if unexpected or any(not k.startswith("_fc2.") for k in missing):
        raise InvalidParameterError(
            f"Stage-1 aggregator does not match TransMIL: missing {missing}, unexpected {unexpected}"
        )
    return head


def load_patch_proj(path: str | Path) -> nn.Linear:
    """Stage-2 `proj` (1024 -> 512) from `proj.pt`: built from its recorded `config`, loaded strictly.

    A `proj.pt` written before the config was recorded holds only `proj.weight` / `proj.bias`; a Linear is fully
    described by its weight matrix, so its shape is its config there."""
    ckpt = _load(path, "projection checkpoint")
    state = ckpt.get("model_state_dict", ckpt) if isinstance(ckpt, dict) else {}
    state = _strip({k.removeprefix("module."): v for k, v in state.items()}, "proj.")
    if "weight" not in state:
        raise InvalidParameterError(f"{path} holds no 'proj.weight'")
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else None
    if config is None:
        out_f, in_f = state["weight"].shape
        config = {"in_features": int(in_f), "out_features": int(out_f), "bias": "bias" in state}
    proj = nn.Linear(**config)
    try:
        proj.load_state_dict(state)
    except RuntimeError as err:
        raise InvalidParameterError(f"{path}: proj weights do not match its config {config}: {err}") from err
    return proj.eval()


# ---- run folders ----------------------------------------------------------------------------------------------
# ---- downstream heads ----------------------------------------------------------------------------
def save_head(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write a head checkpoint: format, the model's constructor config, weights and run metadata."""
    kind = "mil" if isinstance(model, MILHead) else getattr(model, "checkpoint_kind", "report")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = {"format": HEAD_FORMAT, "model": kind, "config": dict(model.config), "state_dict": model.state_dict()}
    with atomic_path(path) as tmp:  # a full disk mid-write left the previous run's head unreadable
        torch.save({**ckpt, "meta": meta}, tmp)
    return path


def mil_sizes(model: MILHead) -> dict[str, Any]:
    """The sizes a MIL head records in its `meta["mil"]` (read by export and evaluation)."""
    sizes = {k: model.config[k] for k in ("kind", "task", "n_outputs", "n_features", "dim")}
    if model.kind != "abmil":
        sizes.update({k: model.mil.config[k] for k in _TRANSMIL_SIZE_KEYS})
    return sizes


def _head_checkpoint(path: str | Path, model: str) -> dict[str, Any]:
    ckpt = _load(path, "head checkpoint")
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "meta" not in ckpt:
        raise InvalidParameterError(f"{path} is not a downstream head checkpoint")
    if ckpt.get("format", HEAD_FORMAT) != HEAD_FORMAT:
        raise InvalidParameterError(f"{path}: unknown head format {ckpt['format']!r} (this code reads {HEAD_FORMAT})")
    if ckpt.get("model", model) != model:
        raise InvalidParameterError(f"{path} holds a {ckpt['model']} head, not a {model} head")
    return ckpt


def load_head(path: str | Path) -> tuple[MILHead, dict]:
    """Rebuild a saved classification/survival head (for export and evaluation), in eval mode."""
    ckpt = _head_checkpoint(path, "mil")
    meta, state = ckpt["meta"], ckpt["state_dict"]
    if "format" in ckpt:
        config = dict(ckpt["config"])
    else:  # legacy: the sizes in meta["mil"]
        if "mil" not in meta:
            raise InvalidParameterError(f"{path} holds no MIL head (a {meta.get('task')} run saves no trained head)")
        sizes = dict(meta["mil"])
        tkw = {k: sizes[k] for k in _TRANSMIL_SIZE_KEYS if k in sizes}
        config = {k: sizes[k] for k in ("kind", "n_features", "n_outputs", "task", "dim")}
        config["transmil_kwargs"] = tkw or None
    model = MILHead(**config)
    if "feature_mean" in state:
        model.set_standardization(state["feature_mean"], state["feature_std"])
    model.load_state_dict(state)
    return model.eval(), meta


def _official_state(ckpt: Any) -> dict[str, torch.Tensor] | None:
    """The state dict of a checkpoint as the official code saves one (a bare `state_dict()`, or under
    `model_state_dict`/`state_dict`, with or without DDP `module.`), or None when it is not one."""
    if not isinstance(ckpt, dict):
        return None
    for key in ("model_state_dict", "state_dict"):
        if isinstance(ckpt.get(key), dict) and "meta" not in ckpt:
            ckpt = ckpt[key]
            break
    if not ckpt or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in ckpt.items()):
        return None
    return {k.removeprefix("module."): v for k, v in ckpt.items()}


def load_official_transmil(
    path: str | Path, labels: list[str] | None = None, task: str = "classification"
) -> tuple[MILHead, dict]:
    """A TransMIL trained by the official downstream code (`models/TransMIL/network.py`: classifier `classifier`,
    ours `_fc2`; `_fc1` = Linear + activation + dropout; width 512, 8 heads, 256 landmarks), as a head of ours.

    Sizes come from the weights (input width from `_fc1.0`, classes from `classifier`); `labels` default to the
    official label indices `"0".."C-1"`. Returns (head in eval mode, meta as `load_head` gives it)."""
    state = _official_state(_load(path, "TransMIL checkpoint"))
    if state is None or "classifier.weight" not in state or "_fc1.0.weight" not in state:
        raise InvalidParameterError(f"{path} is not an official TransMIL checkpoint (no classifier/_fc1 weights)")
    state = {("_fc2." + k[len("classifier.") :] if k.startswith("classifier.") else k): v for k, v in state.items()}
    n_outputs, dim = state["_fc2.weight"].shape
    n_features = int(state["_fc1.0.weight"].shape[1])
    labels = list(labels) if labels is not None else [str(i) for i in range(n_outputs)]
    if task == "classification" and len(labels) != n_outputs:
        raise InvalidParameterError(f"{path}: {n_outputs} classes in the checkpoint, {len(labels)} labels given")
    model = MILHead("transmil", n_features, int(n_outputs), task=task, dim=int(dim))  # type: ignore[arg-type]
    try:
        model.mil.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise InvalidParameterError(f"{path} does not match the official TransMIL layout: {err}") from err
    return model.eval(), {"task": task, "labels": labels, "source": "official TransMIL", "checkpoint": str(path)}


def load_any_head(path: str | Path, labels: list[str] | None = None) -> tuple[MILHead, dict]:
    """A head saved by `mstar downstream`, or an official TransMIL classifier (see `load_official_transmil`)."""
    ckpt = _load(path, "head checkpoint")
    if isinstance(ckpt, dict) and "meta" in ckpt and "state_dict" in ckpt:
        return load_head(path)
    return load_official_transmil(path, labels)


def load_report_generator(path: str | Path) -> tuple[ReportModel, dict, list[str]]:
    """A saved report head: (report model of its recorded `arch`, in eval mode; its constructor config;
    vocabulary itos). A config without `arch` (written before HistGen) is the resampler."""
    ckpt = _head_checkpoint(path, "report")
    if "format" in ckpt:
        config = dict(ckpt["config"])
    else:  # legacy: the sizes in meta["decoder"]
        if "decoder" not in ckpt["meta"]:
            raise InvalidParameterError(f"{path} holds no report generator")
        dec = ckpt["meta"]["decoder"]
        config = {k: dec[k] for k in SIZE_KEYS["resampler"]} | {
            "vocab_size": dec["vocab_size"],
            "n_features": dec["n_features"],
        }
    model = build_report_model(config)
    model.load_state_dict(ckpt["state_dict"], strict=True)
    return model.eval(), config, list(ckpt["meta"]["vocabulary"]["itos"])


def run_meta(task: str, aggregator: str | None, config: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The `meta` of a head checkpoint: task, aggregator, the run's config, creation time and task fields."""
    return {
        "task": task,
        "aggregator": aggregator,
        "config": config,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }


@dataclass
class Stage1Gene:
    """The Stage-1 RNA tower for a downstream task: encoder, `proj_gene`, its gene list and bin edges."""

    encoder: nn.Module
    proj: nn.Linear
    genes: list[str]
    edges: np.ndarray


def load_stage1_gene(path: str | Path) -> Stage1Gene:
    """The gene encoder of a Stage-1 checkpoint, rebuilt from its recorded config and loaded strictly.

    Only quantile binning is supported downstream (the edges are recorded with the checkpoint); a checkpoint
    trained with scBERT binning, or without an RNA tower, is refused with the reason."""
    from training.models.gene_encoder import GeneEncoder

    ckpt = _load(path, "Stage-1 checkpoint")
    state = {k.removeprefix("module."): v for k, v in ckpt.get("model_state_dict", {}).items()}
    genes, edges = ckpt.get("genes") or [], ckpt.get("bin_edges")
    enc_state, proj_state = _strip(state, "gene_encoder."), _strip(state, "proj_gene.")
    if not genes or not enc_state or not proj_state:
        raise InvalidParameterError(f"{path} holds no Stage-1 gene encoder (trained without RNA?)")
    if edges is None:
        raise InvalidParameterError(f"{path}: the gene encoder used scBERT binning; downstream needs quantile edges")
    g = ((ckpt.get("config") or {}).get("model") or {}).get("gene") or {}
    encoder = GeneEncoder(
        len(genes),
        n_bins=int(g.get("n_bins", 5)),
        dim=int(g.get("dim", 200)),
        depth=int(g.get("depth", 1)),
        heads=int(g.get("heads", 10)),
        dim_head=int(g.get("dim_head", 64)),
    )
    encoder.load_state_dict(enc_state)
    agg = ckpt.get("aggregator_config") or _legacy_aggregator_config(ckpt)
    proj = nn.Linear(encoder.dim, int(agg["dim"]))  # as MStar builds it: gene width -> the aggregator's width
    proj.load_state_dict(proj_state)
    return Stage1Gene(encoder, proj, list(genes), np.asarray(edges, dtype=np.float32))


def load_fusion_head(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A slide + RNA head (`model: "fusion"`) rebuilt from its recorded config, weights loaded strictly."""
    from training.models.fusion import FusionHead

    ckpt = _head_checkpoint(path, "fusion")
    if ckpt.get("model") != "fusion":
        raise InvalidParameterError(f"{path} is not a slide + RNA (fusion) head")
    cfg = dict(ckpt["config"])
    cfg["modalities"] = tuple(cfg["modalities"])
    model = FusionHead(**cfg)
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt["meta"]
