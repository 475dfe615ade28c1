"""Downstream MIL heads: slide classification and discrete-time survival over patch features.

Three aggregators, as in mSTAR's downstream code (§3.1):
- `abmil`: ABMIL trained from scratch;
- `transmil`: TransMIL trained from scratch;
- `transmil_pre`: TransMIL initialised from a Stage-1 checkpoint's `vision_encoder.*` weights
  (`training.checkpoints.head_from_stage1`) and fine-tuned at a lower learning rate (official: 2e-5 instead of
  2e-4); the new output layer gets the normal rate.

The same aggregator with `n_bins` outputs is the survival head: sigmoid hazards, S = cumprod(1 - h), risk =
-ΣS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

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
        self.config = {
            "kind": kind,
            "n_features": n_features,
            "n_outputs": n_outputs,
            "task": task,
            "dim": dim,
            "dropout": dropout,
            "transmil_kwargs": dict(transmil_kwargs) if transmil_kwargs else None,
        }
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
