"""TransMIL slide aggregator, laid out exactly like the official TransMIL code used by mSTAR.

Parameter names (`_fc1`, `cls_token`, `layer1`, `layer2`, `pos_layer.proj/proj1/proj2`, `norm`, `_fc2`) and shapes
match the official network so an official or Stage-1 `vision_encoder.*` state dict loads with `strict=True`.

Differences from the official forward, all behaviour-preserving for a single bag:
- runs on any device and takes a batch of bags `[B, N, D]` (the official code hard-codes B=1 and `.cuda()`);
- the Nyström attention is evaluated with the parameters of the `nystrom_attention.NystromAttention` module but
  with the Moore-Penrose initial scale computed *per bag*: the package takes one max over the whole batch, which
  would make a bag's embedding depend on the other bags in its batch. For B=1 the two are identical (tested);
- padding amounts are computed with arithmetic rather than Python branches so the graph stays exportable;
- it also returns the per-patch output tokens (Stage-2 targets) and the last layer's CLS attention (heatmaps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from nystrom_attention import NystromAttention
from torch import nn


@dataclass
class TransMILOutput:
    """What one forward returns.

    embedding: `[B, dim]` the normed CLS token (the mSTAR slide embedding).
    tokens: `[B, N, dim]` normed output tokens at the real input patch positions, in input order.
    attention: `[B, N]` last-layer CLS-to-patch attention (head mean; duplicates folded back onto their source).
    logits: `[B, C]` when the model has a classifier head `_fc2`, else None.
    """

    embedding: torch.Tensor
    tokens: torch.Tensor
    attention: torch.Tensor
    logits: torch.Tensor | None = None


def _pinv_per_sample(x: torch.Tensor, iters: int) -> torch.Tensor:
    """Iterative Moore-Penrose pseudo-inverse (same iteration as the package), scale taken per bag."""
    abs_x = x.abs()
    col = abs_x.sum(dim=-1).amax(dim=(-2, -1), keepdim=True)  # [B,1,1]
    row = abs_x.sum(dim=-2).amax(dim=(-2, -1), keepdim=True)
    z = x.transpose(-1, -2) / (col * row).unsqueeze(-1)
    eye = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)
    for _ in range(iters):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - (xz @ (15 * eye - (xz @ (7 * eye - xz)))))
    return z


def nystrom_forward(
    attn: NystromAttention, x: torch.Tensor, query_index: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Evaluate `attn` on `x` [B, n, dim] without mask (as TransMIL calls it).

    Returns the output `[B, n, dim]` and, if `query_index` is given, that query's attention row over the n keys
    `[B, heads, n]` (computed from the three Nyström factors without forming the n x n matrix).
    """
    b, n, _ = x.shape
    h, m = attn.heads, attn.num_landmarks
    # the package zero-pads at the front to a multiple of the landmark count; written so that
    # total == m * seg holds symbolically (keeps a dynamic-shape export free of divisibility guards)
    seg = (n + m - 1) // m
    total = m * seg
    pad = total - n
    x = F.pad(x, (0, 0, pad, 0))
    q, k, v = attn.to_qkv(x).chunk(3, dim=-1)
    q, k, v = (t.reshape(b, total, h, -1).transpose(1, 2) for t in (q, k, v))
    q = q * attn.scale
    d = q.shape[-1]
    q_l = q.reshape(b, h, m, seg, d).sum(dim=3) / seg
    k_l = k.reshape(b, h, m, seg, d).sum(dim=3) / seg
    attn1 = (q @ k_l.transpose(-1, -2)).softmax(dim=-1)
    attn2 = (q_l @ k_l.transpose(-1, -2)).softmax(dim=-1)
    attn3 = (q_l @ k.transpose(-1, -2)).softmax(dim=-1)
    attn2_inv = _pinv_per_sample(attn2, attn.pinv_iterations)
    out = (attn1 @ attn2_inv) @ (attn3 @ v)
    if attn.residual:
        out = out + attn.res_conv(v)
    out = out.transpose(1, 2).reshape(b, total, -1)
    out = attn.to_out(out)[:, -n:]
    row = None
    if query_index is not None:
        row = (attn1[:, :, pad + query_index].unsqueeze(-2) @ attn2_inv @ attn3).squeeze(-2)[:, :, -n:]
    return out, row


def _ceil_sqrt(n: int) -> int:
    """ceil(sqrt(n)) that stays symbolic under torch.export (a SymInt in, a SymInt out)."""
    if isinstance(n, int):
        return math.isqrt(n - 1) + 1 if n > 1 else 1
    # exporting: ONNX has no symbolic sqrt, so take it on a tensor and come back as an (unbacked) size
    side = torch.ceil(torch.sqrt(torch.full((), n, dtype=torch.float64))).to(torch.int64).item()
    torch._check(side >= 1)
    torch._check(side * side >= n)
    return side


class TransLayer(nn.Module):
    """Pre-LayerNorm + Nyström attention with a residual; the official layer has no MLP block."""

    def __init__(
        self,
        dim: int = 512,
        heads: int = 8,
        dim_head: int | None = None,
        num_landmarks: int | None = None,
        pinv_iterations: int = 6,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(
            dim=dim,
            dim_head=dim_head or dim // heads,
            heads=heads,
            num_landmarks=num_landmarks or dim // 2,
            pinv_iterations=pinv_iterations,
            residual=True,
            dropout=dropout,
        )

    def forward(self, x: torch.Tensor, query_index: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        out, row = nystrom_forward(self.attn, self.norm(x), query_index)
        return x + out, row


class PPEG(nn.Module):
    """Pyramid position encoding: identity + depthwise 7/5/3 convs over the square token grid; CLS untouched."""

    def __init__(self, dim: int = 512) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 7, 1, 7 // 2, groups=dim)
        self.proj1 = nn.Conv2d(dim, dim, 5, 1, 5 // 2, groups=dim)
        self.proj2 = nn.Conv2d(dim, dim, 3, 1, 3 // 2, groups=dim)

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        b, _, c = x.shape
        cls_token, feat = x[:, :1], x[:, 1:]
        grid = feat.transpose(1, 2).reshape(b, c, side, side)
        grid = self.proj(grid) + grid + self.proj1(grid) + self.proj2(grid)
        return torch.cat((cls_token, grid.flatten(2).transpose(1, 2)), dim=1)


class TransMIL(nn.Module):
    """TransMIL over a batch of bags of patch features.

    Defaults reproduce the official/mSTAR configuration (1024 -> 512, 8 heads x 64, 256 landmarks, 6 pinv
    iterations, dropouts 0.25 / 0.1). `n_classes=0` builds no `_fc2`, as the Stage-1 `vision_encoder` has none.
    Smaller `dim`/`num_landmarks` give the CPU test configurations.
    """

    def __init__(
        self,
        n_features: int = 1024,
        dim: int = 512,
        n_classes: int = 0,
        heads: int = 8,
        dim_head: int | None = None,
        num_landmarks: int | None = None,
        pinv_iterations: int = 6,
        fc_dropout: float = 0.25,
        attn_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        # the constructor arguments, resolved: checkpoints store them so that a load never infers sizes from weights
        self.config = {
            "n_features": n_features,
            "dim": dim,
            "n_classes": n_classes,
            "heads": heads,
            "dim_head": dim_head or dim // heads,
            "num_landmarks": num_landmarks or dim // 2,
            "pinv_iterations": pinv_iterations,
            "fc_dropout": fc_dropout,
            "attn_dropout": attn_dropout,
        }
        self.n_features, self.dim = n_features, dim
        self.pos_layer = PPEG(dim)
        self._fc1 = nn.Sequential(nn.Linear(n_features, dim), nn.ReLU(), nn.Dropout(fc_dropout))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        layer_kw = dict(
            dim=dim,
            heads=heads,
            dim_head=dim_head,
            num_landmarks=num_landmarks,
            pinv_iterations=pinv_iterations,
            dropout=attn_dropout,
        )
        self.layer1 = TransLayer(**layer_kw)
        self.layer2 = TransLayer(**layer_kw)
        self.norm = nn.LayerNorm(dim)
        self._fc2 = nn.Linear(dim, n_classes) if n_classes > 0 else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: xavier-normal Linear weights, zero biases, unit LayerNorm, CLS ~ N(0, 1e-6)."""
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.xavier_normal_(mod.weight)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.LayerNorm):
                nn.init.ones_(mod.weight)
                nn.init.zeros_(mod.bias)
        nn.init.normal_(self.cls_token, std=1e-6)

    def forward(self, features: torch.Tensor) -> TransMILOutput:
        if features.dim() == 2:
            features = features.unsqueeze(0)
        b, n, _ = features.shape
        h = self._fc1(features.float())
        side = _ceil_sqrt(n)
        # square padding by repetition: position n+j repeats patch j (official `h[:, :add_length]`)
        src = torch.arange(side * side, device=h.device) % torch.full((), n, device=h.device)
        h = h[:, src]
        h = torch.cat((self.cls_token.expand(b, -1, -1), h), dim=1)
        h, _ = self.layer1(h)
        h = self.pos_layer(h, side)
        h, row = self.layer2(h, query_index=0)
        h = self.norm(h)
        embedding = h[:, 0]
        # CLS attention over the square grid, duplicates folded back onto the patch they repeat
        grid_attn = row.mean(dim=1)[:, 1:]
        attention = torch.zeros(b, n, dtype=grid_attn.dtype, device=h.device).index_add(1, src, grid_attn)
        logits = self._fc2(embedding) if self._fc2 is not None else None
        return TransMILOutput(embedding=embedding, tokens=h[:, 1 : n + 1], attention=attention, logits=logits)
