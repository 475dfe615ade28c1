"""Exponential moving average of a model (the DINO/BYOL "teacher" update) and its momentum schedule.

Stage 2 keeps an EMA copy of the student patch encoder; a consistency term pulls the student's features towards
the EMA's so the student does not drift far from what it already knew (mSTAR §2, "to prevent catastrophic
forgetting"). The EMA never receives gradients: it is updated in place after each optimiser step.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def momentum_at(step: int, total: int, base: float = 0.996, final: float = 1.0, schedule: str = "cosine") -> float:
    """EMA momentum at `step` of `total`: cosine from `base` to `final` (DINO), or constant `base`."""
    if schedule == "constant" or total <= 1:
        return base
    if schedule != "cosine":
        raise ValueError(f"unknown momentum schedule {schedule!r} (cosine or constant)")
    progress = min(1.0, max(0.0, step / (total - 1)))
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2


class EMA(nn.Module):
    """A frozen copy of `model` whose weights follow `ema = m * ema + (1 - m) * model` after each update."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, momentum: float) -> None:
        model = getattr(model, "module", model)  # unwrap DDP
        ema_p = list(self.module.parameters())
        torch._foreach_mul_(ema_p, momentum)
        torch._foreach_add_(ema_p, [p.detach() for p in model.parameters()], alpha=1.0 - momentum)
        for b_ema, b in zip(self.module.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)

    def train(self, mode: bool = True) -> EMA:
        super().train(False)  # the EMA always runs in eval mode (no dropout / drop-path)
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)
