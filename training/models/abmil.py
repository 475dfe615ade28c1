"""Attention-based MIL (Ilse et al. 2018) in the gated-free form used by mSTAR's downstream code (§3.1).

Linear(in→512)+ReLU+Dropout(0.25) → attention Linear(512→128)–Tanh–Linear(128→1) → softmax over the N
patches → attention-weighted sum → Linear(512→C). Parameter names are our own (the official ABMIL is trained
per task, so there is no checkpoint to stay compatible with).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ABMILOutput:
    """logits `[B, C]`, attention `[B, N]` (sums to 1 per bag), embedding `[B, dim]` (the pooled
    bag vector)."""

    logits: torch.Tensor
    attention: torch.Tensor
    embedding: torch.Tensor


class ABMIL(nn.Module):
    """ABMIL over a batch of bags `[B, N, D]` (or one bag `[N, D]`)."""

    def __init__(
        self,
        n_features: int = 1024,
        n_classes: int = 2,
        dim: int = 512,
        attn_dim: int = 128,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        self.config = {
            "n_features": n_features,
            "n_classes": n_classes,
            "dim": dim,
            "attn_dim": attn_dim,
            "dropout": dropout,
        }
        self.n_features, self.dim, self.n_classes = n_features, dim, n_classes
        self.fc = nn.Sequential(nn.Linear(n_features, dim), nn.ReLU(), nn.Dropout(dropout))
        self.attention = nn.Sequential(nn.Linear(dim, attn_dim), nn.Tanh(), nn.Linear(attn_dim, 1))
        self.classifier = nn.Linear(dim, n_classes)

    def forward(self, features: torch.Tensor) -> ABMILOutput:
        if features.dim() == 2:
            features = features.unsqueeze(0)
        h = self.fc(features.float())  # [B, N, dim]
        a = self.attention(h).squeeze(-1).softmax(dim=-1)  # [B, N]
        pooled = torch.einsum("bn,bnd->bd", a, h)
        return ABMILOutput(logits=self.classifier(pooled), attention=a, embedding=pooled)
