"""RNA-Seq encoder, scBERT-style: binned expression embedding + gene-identity embedding -> Performer -> CLS.

mSTAR (method reference §1.4): Gene2Vec (200-d) gene embeddings summed with an expression-bin embedding, a
shallow Performer (about 1 layer, dim 200, 10 heads x 64) and a linear projection of the CLS to 512 (`proj_gene`,
which lives in the Stage-1 wrapper). The CLS is a prepended learnable token (decision §7.6). The gene vocabulary
comes from the cohort; a Gene2Vec table can be read from a local text file (`GENE v1 v2 ...` per line).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from performer_pytorch import Performer
from torch import nn

from service.errors import InvalidParameterError


def read_gene2vec(path: str | Path, genes: Sequence[str], dim: int) -> tuple[torch.Tensor, int]:
    """Rows of a Gene2Vec text table for `genes` (random N(0, 0.02) for absent genes); returns (table, n_found)."""
    wanted = {g: i for i, g in enumerate(genes)}
    table = torch.randn(len(genes), dim) * 0.02
    found = 0
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) < 2 or parts[0] not in wanted:
                continue
            if len(parts) - 1 != dim:
                raise InvalidParameterError(f"{path}: gene {parts[0]} has {len(parts) - 1} values, expected {dim}")
            table[wanted[parts[0]]] = torch.tensor([float(v) for v in parts[1:]])
            found += 1
    return table, found


def bin_expression(values: np.ndarray, n_bins: int, edges: np.ndarray | None = None) -> np.ndarray:
    """Map expression `[cases, genes]` to integer bins in `[0, n_bins]`.

    Without `edges`: scBERT binning (truncate to int, clip at `n_bins`), meant for log1p(RSEM) values.
    With per-gene `edges` `[genes, n_bins]` (from `quantile_edges`): bin = number of edges the value exceeds.
    """
    if edges is None:
        return np.clip(np.floor(values), 0, n_bins).astype(np.int64)
    return (values[..., None] > edges[None]).sum(-1).astype(np.int64)


def quantile_edges(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Per-gene quantile edges `[genes, n_bins]` (training cases only), for data not on a log1p(RSEM) scale."""
    qs = np.linspace(0, 1, n_bins + 2)[1:-1]
    return np.quantile(values, qs, axis=0).T.astype(np.float32)


class GeneEncoder(nn.Module):
    """`forward(bins [B, G] int64) -> [B, dim]` CLS output. Bin ids 0..n_bins; PAD/CLS ids are reserved."""

    def __init__(
        self,
        n_genes: int,
        n_bins: int = 5,
        dim: int = 200,
        depth: int = 1,
        heads: int = 10,
        dim_head: int = 64,
        gene_table: torch.Tensor | None = None,
        freeze_gene_table: bool = True,
    ) -> None:
        super().__init__()
        self.n_genes, self.n_bins, self.dim = n_genes, n_bins, dim
        # the sizes a checkpoint records to rebuild the encoder (the gene table is a weight, not a size)
        self.config = {"n_genes": n_genes, "n_bins": n_bins, "dim": dim, "depth": depth, "heads": heads}
        self.config["dim_head"] = dim_head
        self.cls_id = n_bins + 1
        self.bin_emb = nn.Embedding(n_bins + 2, dim)
        self.gene_emb = nn.Embedding(n_genes, dim)
        if gene_table is not None:
            if tuple(gene_table.shape) != (n_genes, dim):
                raise InvalidParameterError(f"gene table {tuple(gene_table.shape)} != ({n_genes}, {dim})")
            self.gene_emb.weight.data.copy_(gene_table)
            self.gene_emb.weight.requires_grad_(not freeze_gene_table)
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, dim))
        # fixed random features (no redraw) keep DDP ranks and resumed runs identical
        self.performer = Performer(dim=dim, depth=depth, heads=heads, dim_head=dim_head, feature_redraw_interval=None)
        self.norm = nn.LayerNorm(dim)

    def forward(self, bins: torch.Tensor) -> torch.Tensor:
        b, g = bins.shape
        if g != self.n_genes:
            raise InvalidParameterError(f"expected {self.n_genes} genes, got {g}")
        x = self.bin_emb(bins) + self.gene_emb.weight.unsqueeze(0)
        cls = self.bin_emb.weight[self.cls_id].view(1, 1, -1) + self.cls_pos
        x = torch.cat((cls.expand(b, -1, -1), x), dim=1)
        x = self.performer(x)
        return self.norm(x[:, 0])
