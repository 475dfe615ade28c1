"""HistGen (Guo et al., MICCAI 2024), the report generator of mSTAR §3.6, as the default report architecture.

Structure (sizes from the official HistGen/mSTAR configuration; the demo shrinks them):
- **Input map**: patch features [N, D] -> Linear(D→d) + ReLU + dropout. (The official code maps 1024→2048
  with `wsi_mapping` and then 2048→512 with `att_embed`; two stacked Linears without a non-linearity
  between them are one Linear, so this is the same function class with fewer parameters.)
- **Cross-modal context module (CMC)**: one learned memory matrix `[cmm_size, d]` (2048 × 512) queried by both
  sides through the same top-k memory attention (`MemoryQuery`, top-k 512): on the visual side,
  `n_prototypes` (512) patch tokens picked at evenly spaced indices query it and every patch token attends to
  those responses (added residually); on the text side, every word embedding queries it (added residually).
- **Local-global hierarchical encoder (HAT)**: the token sequence is cut into regions of `region_size - 1`
  consecutive patches (96 - 1), each with a learned region token; `hat_layers` (2) layers each run a
  transformer layer inside every region (local) and, in every layer but the last, a transformer layer over
  the region tokens of the slide (global), whose outputs replace the region tokens. Each region is then
  attention-pooled to one vector (`tanh(dense(·))`), so the decoder's memory is `[n_regions, d]`: its length
  grows with the slide (ceil(N / (region_size - 1))), unlike the resampler's fixed memory.
- **Decoder**: R2Gen-style pre-norm transformer decoder, `decoder_layers` (3) layers, d_model/d_ff 512, 8 heads,
  dropout 0.1; word embeddings × sqrt(d) + sinusoidal positions.

Deliberate differences from the official code (none changes the architecture's shape):
- the WSI (global) encoder reads the region tokens themselves; the official `outputs[:, ::region_size]` reads
  the first *patch* of each region while its region token sits last;
- padding is masked everywhere (in-region attention, the global encoder, pooling, the prototype sampling),
  so a padded batch gives the same output per slide as batch size 1 (the official code trains with batch 1
  and pools over zero-padding);
- word embeddings start at N(0, 1/d_model) (PyTorch's default N(0, 1) in the official code): × √d they are then
  unit-sized like the positions and the memory response, instead of √d times larger;
- sinusoidal positions are added once (inside regions at the first layer, over regions before each global
  layer); the official code re-adds in-region positions at every layer;
- attention is `scaled_dot_product_attention` with explicit masks, which exports to ONNX with a dynamic N.

`export_step` and `encode` carry no data-dependent Python branches, so both export with torch.export.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from training.models.report_decoder import ReportModel, Vocabulary


def sinusoid(length: int | torch.SymInt, d: int, device: torch.device) -> torch.Tensor:
    """Sinusoidal positions `[length, d]` computed on the fly (no table to outgrow, dynamic length exports)."""
    pos = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    div = torch.exp(torch.arange(0, d, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / d))
    pe = torch.zeros(pos.shape[0], d, device=device)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)[:, : d // 2]
    return pe


class Attention(nn.Module):
    """Multi-head attention over `scaled_dot_product_attention`; `keep` is a boolean mask broadcastable to
    `[B, h, Q, K]`, True where a query may attend to a key."""

    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        if d % heads:
            raise ValueError(f"d_model {d} is not divisible by heads {heads}")
        self.h, self.dk, self.p = heads, d // heads, dropout
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.h, self.dk)).transpose(1, 2)

    def forward(
        self, q: torch.Tensor, kv: torch.Tensor, keep: torch.Tensor | None = None, causal: bool = False
    ) -> torch.Tensor:
        out = F.scaled_dot_product_attention(
            self._split(self.q(q)),
            self._split(self.k(kv)),
            self._split(self.v(kv)),
            attn_mask=keep,
            dropout_p=self.p if self.training else 0.0,
            is_causal=causal,
        )
        return self.o(out.transpose(1, 2).flatten(2))


class MemoryQuery(nn.Module):
    """HistGen's memory querying and responding: multi-head attention of queries over the memory matrix in
    which each query keeps only its `topk` highest-scoring memory slots (the others get probability 0)."""

    def __init__(self, d: int, heads: int, topk: int, dropout: float) -> None:
        super().__init__()
        self.h, self.dk, self.topk = heads, d // heads, topk
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.drop = nn.Dropout(dropout)

    def forward(self, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        b = query.shape[0]
        q = self.q(query).unflatten(-1, (self.h, self.dk)).transpose(1, 2)  # [B, h, Q, dk]
        k = self.k(memory).unflatten(-1, (self.h, self.dk)).transpose(0, 1)  # [h, S, dk]
        v = self.v(memory).unflatten(-1, (self.h, self.dk)).transpose(0, 1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.dk)  # [B, h, Q, S]
        top, idx = scores.topk(min(self.topk, memory.shape[0]), dim=-1)
        kept = torch.full_like(scores, float("-inf")).scatter(-1, idx, top)
        out = self.drop(kept.softmax(-1)) @ v
        return self.o(out.transpose(1, 2).reshape(b, -1, self.h * self.dk))


class Block(nn.Module):
    """Pre-norm transformer layer: self-attention (+ optional cross-attention) + feed-forward."""

    def __init__(self, d: int, heads: int, d_ff: int, dropout: float, cross: bool = False) -> None:
        super().__init__()
        self.n1, self.att = nn.LayerNorm(d), Attention(d, heads, dropout)
        self.cross = Attention(d, heads, dropout) if cross else None
        self.n2 = nn.LayerNorm(d) if cross else None
        self.n3 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, d_ff), nn.ReLU(), nn.Dropout(dropout), nn.Linear(d_ff, d))
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        keep: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        memory_keep: torch.Tensor | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        h = self.n1(x)
        x = x + self.drop(self.att(h, h, keep, causal))
        if self.cross is not None:
            x = x + self.drop(self.cross(self.n2(x), memory, memory_keep))
        return x + self.drop(self.ff(self.n3(x)))


class HATEncoder(nn.Module):
    """Local-global hierarchical encoder: patch tokens [B, N, d] -> one pooled vector per region [B, R, d]."""

    def __init__(self, d: int, heads: int, d_ff: int, dropout: float, region_size: int, layers: int) -> None:
        super().__init__()
        if region_size < 2:
            raise ValueError("region_size must be >= 2 (one region token + at least one patch)")
        if layers < 1:
            raise ValueError("hat_layers must be >= 1")
        self.region, self.d = region_size, d
        self.region_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.local = nn.ModuleList(Block(d, heads, d_ff, dropout) for _ in range(layers))
        self.glob = nn.ModuleList(Block(d, heads, d_ff, dropout) for _ in range(layers - 1))
        self.norm = nn.LayerNorm(d)
        self.pool_proj = nn.Linear(d, d)
        self.pool_v = nn.Linear(d, 1, bias=False)
        self.pool_dense = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, N, d], valid [B, N] (True at real patches) -> (memory [B, R, d], memory valid [B, R])."""
        b, n, d = x.shape
        per = self.region - 1
        n_reg = (n + per - 1) // per
        pad = n_reg * per - n
        x = F.pad(x, (0, 0, 0, pad)).reshape(b * n_reg, per, d)
        valid = F.pad(valid, (0, pad), value=False).reshape(b * n_reg, per)
        tok = self.region_token.expand(b * n_reg, 1, d)
        x = torch.cat([tok, x], 1) + sinusoid(self.region, d, x.device)  # region token first
        keep_tok = torch.cat([torch.ones_like(valid[:, :1]), valid], 1)  # [B*R, region]
        region_valid = valid.any(1).reshape(b, n_reg)
        region_valid = region_valid | (torch.arange(n_reg, device=x.device) == 0)  # a slide has >= 1 region
        keep = keep_tok[:, None, None, :]
        for i, layer in enumerate(self.local):
            x = layer(x, keep)
            if i < len(self.glob):
                g = x[:, 0].reshape(b, n_reg, d) + sinusoid(n_reg, d, x.device)
                g = self.glob[i](g, region_valid[:, None, None, :])
                x = torch.cat([g.reshape(b * n_reg, 1, d), x[:, 1:]], 1)
        x = self.norm(x)
        w = torch.tanh(self.pool_v(self.pool_proj(x))).squeeze(-1).masked_fill(~keep_tok, float("-inf"))
        pooled = (w.softmax(-1).unsqueeze(-1) * x).sum(1)
        return torch.tanh(self.pool_dense(pooled)).reshape(b, n_reg, d), region_valid


class HistGenGenerator(ReportModel):
    """`report.arch: histgen` (the default). The exported pair is the same as the resampler's:
    `encode` (features [N, D] -> memory [n_regions, d]) once per slide, `export_step` once per token."""

    arch = "histgen"

    def __init__(
        self,
        n_features: int,
        vocab_size: int,
        d_model: int = 512,
        decoder_layers: int = 3,
        heads: int = 8,
        d_ff: int = 512,
        dropout: float = 0.1,
        max_len: int = 100,
        region_size: int = 96,
        hat_layers: int = 2,
        n_prototypes: int = 512,
        cmm_size: int = 2048,
        topk: int = 512,
    ) -> None:
        super().__init__()
        self.config = {
            "arch": "histgen",
            "n_features": n_features,
            "vocab_size": vocab_size,
            "d_model": d_model,
            "decoder_layers": decoder_layers,
            "heads": heads,
            "d_ff": d_ff,
            "dropout": dropout,
            "max_len": max_len,
            "region_size": region_size,
            "hat_layers": hat_layers,
            "n_prototypes": n_prototypes,
            "cmm_size": cmm_size,
            "topk": topk,
        }
        self.max_len, self.d, self.n_prototypes = max_len, d_model, n_prototypes
        self.in_proj = nn.Sequential(nn.Linear(n_features, d_model), nn.ReLU(), nn.Dropout(dropout))
        self.memory_matrix = nn.Parameter(torch.randn(cmm_size, d_model) / d_model)
        self.cmn = MemoryQuery(d_model, heads, topk, dropout)  # shared by the visual and the text side
        self.visual_response = Attention(d_model, heads, dropout)
        self.encoder = HATEncoder(d_model, heads, d_ff, dropout, region_size, hat_layers)
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=Vocabulary.PAD)
        # N(0, 1/d): after the × √d scale a word starts at unit size per dimension, like the positions and the
        # memory response it is summed with. PyTorch's N(0, 1) (the official code's) makes the words √d times
        # larger, so the decoder starts as a word-bigram model that hardly reads the slide: on the ~100 reports of
        # the demo cohort it wrote one generic report for every slide (docs/downstream.md)
        nn.init.normal_(self.embed.weight, 0.0, d_model**-0.5)
        with torch.no_grad():
            self.embed.weight[Vocabulary.PAD].zero_()
        self.drop = nn.Dropout(dropout)
        self.decoder = nn.ModuleList(Block(d_model, heads, d_ff, dropout, cross=True) for _ in range(decoder_layers))
        self.out_norm = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, vocab_size)

    def _prototypes(self, h: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """`n_prototypes` tokens per slide at evenly spaced indices over its real patches (HistGen's linspace)."""
        n_valid = valid.sum(1, keepdim=True).float()  # real patches come first in every padded row
        steps = torch.arange(self.n_prototypes, device=h.device, dtype=torch.float32)
        idx = (steps * (n_valid - 1) / max(self.n_prototypes - 1, 1)).floor().long()  # [B, K]
        return h.gather(1, idx.unsqueeze(-1).expand(-1, -1, h.shape[-1]))

    def encode_masked(
        self, features: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.in_proj(features.float())
        valid = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device) if padding_mask is None else ~padding_mask
        responses = self.cmn(self._prototypes(h, valid), self.memory_matrix)
        h = h + self.visual_response(h, responses)
        memory, mem_valid = self.encoder(h, valid)
        return memory, ~mem_valid

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) * math.sqrt(self.d) + sinusoid(tokens.shape[1], self.d, tokens.device)
        x = self.drop(x)
        return x + self.cmn(x, self.memory_matrix)  # text-side memory query

    def decode(
        self, tokens: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        t = tokens.shape[1]
        keep = ~torch.triu(torch.ones(t, t, dtype=torch.bool, device=tokens.device), diagonal=1)
        keep = keep[None, None] & (tokens != Vocabulary.PAD)[:, None, None, :]  # causal, padded keys hidden
        keep = keep | torch.eye(t, dtype=torch.bool, device=tokens.device)  # a pad row still sees itself
        mem_keep = None if memory_mask is None else ~memory_mask[:, None, None, :]
        x = self._embed(tokens)
        for layer in self.decoder:
            x = layer(x, keep, memory, mem_keep)
        return self.out(self.out_norm(x))

    def export_step(self, tokens: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        x = self._embed(tokens)
        for layer in self.decoder:
            x = layer(x, None, memory, None, causal=True)
        return self.out(self.out_norm(x[:, -1:]))[:, 0]
