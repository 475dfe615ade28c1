"""Downstream MIL heads: slide classification and discrete-time survival over patch features.

Three aggregators, as in mSTAR's downstream code (§3.1):
- `abmil`: ABMIL trained from scratch;
- `transmil`: TransMIL trained from scratch;
- `transmil_pre`: TransMIL initialised from a Stage-1 checkpoint's `vision_encoder.*` weights and fine-tuned
  at a lower learning rate (official: 2e-5 instead of 2e-4); the new output layer gets the normal rate.

The same aggregator with `n_bins` outputs is the survival head: sigmoid hazards, S = cumprod(1 - h), risk =
-ΣS.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from service.errors import InvalidParameterError
from training.models.abmil import ABMIL
from training.models.transmil import TransMIL
from training.survival import hazards_and_survival, risk_from_survival

AggregatorKind = Literal["abmil", "transmil", "transmil_pre"]


@dataclass
class HeadOutput:
    """logits `[B, C]`; attention `[B, N]`; embedding `[B, dim]`; for survival also hazards,
    survival `[B, K]`, risk `[B]`."""

    logits: torch.Tensor
    attention: torch.Tensor
    embedding: torch.Tensor
    hazards: torch.Tensor | None = None
    survival: torch.Tensor | None = None
    risk: torch.Tensor | None = None


def load_stage1_state(path: str | Path, prefix: str = "vision_encoder.") -> tuple[dict[str, torch.Tensor], dict]:
    """The `prefix` sub-state of a Stage-1 checkpoint (DDP `module.` stripped) and the checkpoint's
    config, if any.

    Accepts `{'model_state_dict': ...}` (the official layout) or a bare state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidParameterError(f"Stage-1 checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise InvalidParameterError(f"cannot read Stage-1 checkpoint {path}: {err}") from err
    state = ckpt.get("model_state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise InvalidParameterError(f"{path} is not a state dict checkpoint")
    out = {}
    for key, val in state.items():
        key = key.removeprefix("module.")
        if key.startswith(prefix):
            out[key[len(prefix) :]] = val
    if not out:
        raise InvalidParameterError(f"{path} holds no '{prefix}*' weights")
    config = ckpt.get("config", {}) if isinstance(ckpt, dict) else {}
    config = dict(config) if isinstance(config, dict) else {}
    # Stage 1 may standardise patch features (train-set mean/std); whoever reuses its aggregator must too
    for key in ("feature_mean", "feature_std"):
        if isinstance(ckpt, dict) and ckpt.get(key) is not None:
            config[key] = torch.as_tensor(np.asarray(ckpt[key]), dtype=torch.float32)
    return out, config


def transmil_kwargs_from_state(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Recover TransMIL sizes from weight shapes (landmark count is not a weight and must come from
    config)."""
    fc1 = state["_fc1.0.weight"]
    dim, n_features = int(fc1.shape[0]), int(fc1.shape[1])
    heads = int(state["layer1.attn.res_conv.weight"].shape[0])
    inner = int(state["layer1.attn.to_qkv.weight"].shape[0]) // 3
    return {"n_features": n_features, "dim": dim, "heads": heads, "dim_head": inner // heads}


def stage1_transmil_kwargs(state: dict[str, torch.Tensor], config: dict) -> dict[str, Any]:
    """TransMIL kwargs for a Stage-1 `vision_encoder`: shapes from the weights, landmarks from the config."""
    kw: dict[str, Any] = transmil_kwargs_from_state(state)
    model_cfg = config.get("model", config) if isinstance(config, dict) else {}
    agg = model_cfg.get("aggregator", {}) if isinstance(model_cfg, dict) else {}
    if isinstance(agg, dict):
        kw.update({k: agg[k] for k in ("num_landmarks", "pinv_iterations") if agg.get(k) is not None})
    return kw


class Stage1Vision(nn.Module):
    """The Stage-1 aggregator with the input standardisation it was trained with (if any)."""

    def __init__(self, aggregator: nn.Module, mean: torch.Tensor | None = None, std: torch.Tensor | None = None):
        super().__init__()
        self.aggregator = aggregator
        self.register_buffer("feature_mean", None if mean is None else torch.as_tensor(mean).float())
        self.register_buffer("feature_std", None if std is None else torch.as_tensor(std).float())

    def forward(self, features: torch.Tensor) -> Any:
        if self.feature_mean is not None:
            features = (features.float() - self.feature_mean) / self.feature_std
        return self.aggregator(features)


def load_stage1_vision(path: str | Path) -> Stage1Vision:
    """Frozen Stage-1 `vision_encoder` (TransMIL, strict load) plus its feature standardisation, in eval mode."""
    state, config = load_stage1_state(path)
    model = TransMIL(**stage1_transmil_kwargs(state, config))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise InvalidParameterError(f"Stage-1 aggregator in {path} does not load into TransMIL: {err}") from err
    return Stage1Vision(model, config.get("feature_mean"), config.get("feature_std")).eval()


class MILHead(nn.Module):
    """Aggregator + output layer. `task='survival'` turns the outputs into hazards over `n_outputs`
    time bins."""

    def __init__(
        self,
        kind: AggregatorKind,
        n_features: int,
        n_outputs: int,
        task: Literal["classification", "survival"] = "classification",
        dim: int = 512,
        dropout: float = 0.25,
        transmil_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if kind not in ("abmil", "transmil", "transmil_pre"):
            raise InvalidParameterError(f"unknown aggregator {kind!r}: use abmil, transmil or transmil_pre")
        if n_outputs < 1:
            raise InvalidParameterError("a head needs at least one output")
        self.kind, self.task, self.n_outputs = kind, task, n_outputs
        self.feature_mean: torch.Tensor | None
        self.feature_std: torch.Tensor | None
        self.register_buffer("feature_mean", None)
        self.register_buffer("feature_std", None)
        if kind == "abmil":
            self.mil: nn.Module = ABMIL(n_features, n_outputs, dim=dim, dropout=dropout)
        else:
            kw = {"n_features": n_features, "dim": dim, "fc_dropout": dropout, **(transmil_kwargs or {})}
            self.mil = TransMIL(n_classes=n_outputs, **kw)

    @classmethod
    def from_stage1(
        cls,
        checkpoint: str | Path,
        n_outputs: int,
        task: Literal["classification", "survival"] = "classification",
        transmil_kwargs: dict[str, Any] | None = None,
    ) -> MILHead:
        """TransMIL_Pre: a TransMIL whose every weight but `_fc2` comes from the Stage-1
        `vision_encoder`."""
        state, config = load_stage1_state(checkpoint)
        kw = stage1_transmil_kwargs(state, config)
        kw.update(transmil_kwargs or {})
        n_features, dim = kw.pop("n_features"), kw.pop("dim")
        head = cls("transmil_pre", n_features, n_outputs, task=task, dim=dim, transmil_kwargs=kw)
        if "feature_mean" in config:
            head.set_standardization(config["feature_mean"], config["feature_std"])
        missing, unexpected = head.mil.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("_fc2.") for k in missing):
            raise InvalidParameterError(
                f"Stage-1 aggregator does not match TransMIL: missing {missing}, unexpected {unexpected}"
            )
        return head

    def set_standardization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardise inputs as the Stage-1 aggregator saw them (stored with the head, exported with it)."""
        self.feature_mean = torch.as_tensor(mean, dtype=torch.float32).clone()
        self.feature_std = torch.as_tensor(std, dtype=torch.float32).clone()

    def new_parameters(self) -> list[nn.Parameter]:
        """Parameters that no checkpoint initialised (the output layer for transmil_pre)."""
        if self.kind == "transmil_pre":
            return list(self.mil._fc2.parameters())
        return list(self.parameters())

    def param_groups(self, lr: float, lr_pretrained: float) -> list[dict[str, Any]]:
        """One group at `lr` for new weights, one at `lr_pretrained` for Stage-1 weights
        (transmil_pre only)."""
        new = self.new_parameters()
        new_ids = {id(p) for p in new}
        old = [p for p in self.parameters() if id(p) not in new_ids]
        groups = [{"params": new, "lr": lr}]
        if old:
            groups.append({"params": old, "lr": lr_pretrained})
        return groups

    def forward(self, features: torch.Tensor) -> HeadOutput:
        if self.feature_mean is not None:
            features = (features.float() - self.feature_mean) / self.feature_std
        out = self.mil(features)
        out_logits = out.logits
        result = HeadOutput(logits=out_logits, attention=out.attention, embedding=out.embedding)
        if self.task == "survival":
            result.hazards, result.survival = hazards_and_survival(out_logits)
            result.risk = risk_from_survival(result.survival)
        return result
