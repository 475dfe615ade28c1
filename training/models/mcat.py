"""MCAT-style genomic-guided co-attention (Chen et al., ICCV 2021) as a `FusionHead` design (`fusion: mcat`).

The profile is split into gene groups (MCAT uses six functional/pathway categories; here `n_groups` contiguous
blocks of the head's gene list, or the groups a caller passes), each embedded by its own SNN into one token. The
group tokens are the queries of a co-attention over the projected patch features, so every group gathers the
patches that relate to it ("genomic-guided" slide tokens). A small self-attention block and gated attention
pooling then summarise the guided slide tokens (h_wsi) and the group tokens (h_rna). MCAT concatenates the two
into an MLP; here the output is a sum of one linear term per modality plus a bias, as in `gated_concat`, so the
per-modality logit contributions stay exact. All ops are plain matmuls and softmaxes, so the ONNX graph matches.
"""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import nn


def gene_groups(n_genes: int, n_groups: int) -> list[list[int]]:
    """`n_groups` contiguous, near-equal blocks of gene indices (every gene in exactly one group)."""
    n_groups = max(1, min(n_groups, n_genes))
    bounds = [round(i * n_genes / n_groups) for i in range(n_groups + 1)]
    return [list(range(a, b)) for a, b in pairwise(bounds)]


def snn(n_in: int, dim: int, dropout: float) -> nn.Sequential:
    """Porpoise's SNN omic branch: two SELU-initialised blocks of Linear + ELU + AlphaDropout."""
    layers: list[nn.Module] = []
    for a, b in ((n_in, dim), (dim, dim)):
        lin = nn.Linear(a, b)
        nn.init.normal_(lin.weight, std=1.0 / a**0.5)
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.ELU(), nn.AlphaDropout(dropout)]
    return nn.Sequential(*layers)


class _SelfAttention(nn.Module):
    """Pre-norm single-head self-attention with a feed-forward, both residual (a one-layer transformer)."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.ff = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, dim))
        self.scale = dim**-0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, dim]
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        x = x + torch.softmax(q @ k.transpose(1, 2) * self.scale, dim=-1) @ v
        return x + self.ff(self.norm2(x))


class _GatedPool(nn.Module):
    """Gated attention pooling (Ilse et al.) over tokens: [B, T, dim] -> [B, dim]."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Dropout(dropout))
        self.b = nn.Sequential(nn.Linear(dim, dim), nn.Sigmoid(), nn.Dropout(dropout))
        self.w = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.w(self.a(x) * self.b(x)).squeeze(-1), dim=-1)  # [B, T]
        return (weights.unsqueeze(-1) * x).sum(1)


class MCATFusion(nn.Module):
    """`forward(features [N, D] or [B, N, D], rna [B, G]) -> (h_wsi [B, dim], h_rna [B, dim], attention [B, N])`."""

    def __init__(self, n_features: int, groups: list[list[int]], dim: int, dropout: float) -> None:
        super().__init__()
        self.groups = [list(g) for g in groups]
        for i, g in enumerate(self.groups):
            self.register_buffer(f"idx{i}", torch.tensor(g, dtype=torch.long))
        self.omic = nn.ModuleList(snn(len(g), dim, dropout) for g in self.groups)  # one SNN per gene group
        self.patch = nn.Sequential(nn.Linear(n_features, dim), nn.ReLU(), nn.Dropout(dropout))
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.scale = dim**-0.5
        self.path_block, self.omic_block = _SelfAttention(dim, dropout), _SelfAttention(dim, dropout)
        self.path_pool, self.omic_pool = _GatedPool(dim, dropout), _GatedPool(dim, dropout)

    def forward(self, features: torch.Tensor, rna: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        bag = features if features.dim() == 3 else features.unsqueeze(0)
        h = self.patch(bag)  # [B, N, dim]
        tokens = torch.stack(
            [net(rna.index_select(-1, getattr(self, f"idx{i}"))) for i, net in enumerate(self.omic)], dim=1
        )  # [B, k, dim]
        attn = torch.softmax(self.q(tokens) @ self.k(h).transpose(1, 2) * self.scale, dim=-1)  # [B, k, N]
        guided = attn @ self.v(h)  # [B, k, dim]: each gene group's view of the slide
        h_wsi = self.path_pool(self.path_block(guided))
        h_rna = self.omic_pool(self.omic_block(tokens))
        return h_wsi, h_rna, attn.mean(1)
