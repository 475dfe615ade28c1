"""The exact graphs that are served: thin modules around the trained models that fix input/output names, dtypes
and layouts for ONNX export (uint8 NHWC patches in, named tensors out)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from service.errors import BundleError


class U8PatchEncoder(nn.Module):
    """uint8 NHWC patches in, embeddings out: transpose, /255 and mean/std inside the graph."""

    def __init__(self, encoder: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.encoder = encoder
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("inv_std", 1.0 / (torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0))

    def forward(self, pixels_u8: torch.Tensor) -> torch.Tensor:
        x = pixels_u8.permute(0, 3, 1, 2).to(torch.float32)
        return self.encoder((x - self.mean) * self.inv_std)


def _field(out: Any, name: str) -> torch.Tensor:
    val = out[name] if isinstance(out, dict) else getattr(out, name)
    if val is None:
        raise BundleError(f"model output has no {name!r}")
    return val


class SlideAggregator(nn.Module):
    """One bag [N, D] -> (embedding [E], attention [N], tokens [N, E]) from a TransMIL-style output."""

    def __init__(self, aggregator: nn.Module) -> None:
        super().__init__()
        self.aggregator = aggregator

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.aggregator(features.unsqueeze(0))
        return _field(out, "embedding")[0], _field(out, "attention")[0], _field(out, "tokens")[0]


class BagHead(nn.Module):
    """One bag [N, D] -> (logits [C], attention [N]) from a `MILHead` (ABMIL or TransMIL)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.head(features.unsqueeze(0))
        return _field(out, "logits")[0], _field(out, "attention")[0]


class TextTower(nn.Module):
    """Token ids -> prompt embedding in the slide space: BERT CLS then the Stage-1 `proj_text`."""

    def __init__(self, text_encoder: nn.Module, proj: nn.Module | None) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.proj = proj if proj is not None else nn.Identity()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.proj(self.text_encoder(input_ids, attention_mask))


class ReportMemory(nn.Module):
    """Report generator, once per slide: one bag [N, D] -> memory [M, d] (M fixed for the resampler, the number
    of regions for HistGen)."""

    def __init__(self, generator: nn.Module) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.generator.encode(features.unsqueeze(0))[0]


class ReportStep(nn.Module):
    """Report generator, once per token: prefix [B, T] + memory [B, M, d] -> next-token logits [B, V].

    The model's `export_step`: `step` for unpadded prefixes (greedy/beam decoding never pads) without
    data-dependent branches."""

    def __init__(self, generator: nn.Module) -> None:
        super().__init__()
        self.g = generator

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.g.export_step(tokens, memory)
