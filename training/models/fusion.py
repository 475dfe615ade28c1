"""Slide + RNA-Seq heads in the Porpoise family (Chen et al., Cancer Cell 2022): late fusion of an attention-MIL
slide embedding and an RNA embedding.

- Slide branch: ABMIL over patch features (its pooled embedding).
- RNA branch: Porpoise's self-normalising network (SNN: Linear + ELU + AlphaDropout blocks) over the standardised
  profile, or the Stage-1 gene encoder (`GeneEncoder` + `proj_gene`, fine-tuned at `lr_pretrained`) over binned
  values, which is how mSTAR's pretrained RNA tower enters a downstream task.
- Fusion `gated_concat`: each modality's embedding is scaled by a sigmoid gate computed from both (Porpoise's
  gated attention per modality) and the output is a *sum of per-modality linear terms* plus a bias, so the
  logit contributions of slide and RNA are exact and reported. `kronecker`: Porpoise's bilinear fusion, the
  outer product of `[h_wsi, 1]` and `[h_rna, 1]` (both first reduced to `kron_dim`) into a small MLP; it has
  no additive split, so no contributions. `mcat`: MCAT's genomic-guided co-attention over gene groups
  (`training.models.mcat`), gene-group tokens attending over the patches, with the same additive output as
  `gated_concat` (exact contributions).

`modalities` may be `("wsi",)`, `("rna",)` or both, so the unimodal baselines are the same model minus a branch.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from service.errors import InvalidParameterError
from training.models.abmil import ABMIL
from training.models.gene_encoder import GeneEncoder
from training.models.heads import HeadOutput
from training.models.mcat import MCATFusion, gene_groups, snn
from training.survival import hazards_and_survival, risk_from_survival

Fusion = Literal["gated_concat", "kronecker", "mcat"]


class StageOneRNA(nn.Module):
    """The Stage-1 RNA tower as a branch: binned values -> `GeneEncoder` CLS -> `proj_gene` -> [B, out_dim]."""

    def __init__(self, encoder: GeneEncoder, proj: nn.Linear, edges: torch.Tensor, out_dim: int) -> None:
        super().__init__()
        self.encoder, self.proj = encoder, proj
        # sizes recorded so that a head checkpoint rebuilds without the Stage-1 checkpoint
        self.config = {**encoder.config, "proj_dim": proj.out_features, "out_dim": out_dim}
        self.register_buffer("edges", torch.as_tensor(edges, dtype=torch.float32))  # [G, n_bins], raw scale
        self.out = nn.Sequential(nn.Linear(proj.out_features, out_dim), nn.ELU())

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> StageOneRNA:
        """An untrained branch of the recorded sizes (weights and edges then come from a head's state dict)."""
        c = dict(config)
        enc = GeneEncoder(c["n_genes"], c["n_bins"], c["dim"], c["depth"], c["heads"], c["dim_head"])
        edges = torch.zeros(c["n_genes"], c["n_bins"])
        return cls(enc, nn.Linear(c["dim"], c["proj_dim"]), edges, c["out_dim"])

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        bins = (raw.unsqueeze(-1) > self.edges.unsqueeze(0)).sum(-1)
        return self.out(self.proj(self.encoder(bins)))


class FusionHead(nn.Module):
    """`forward(features [N, D] | None, rna [1, G] | None) -> HeadOutput` (+ `contributions` {modality: [1, C]})."""

    checkpoint_kind = "fusion"  # `head.pt`'s "model" field

    def __init__(
        self,
        modalities: tuple[str, ...],
        n_features: int,
        n_genes: int,
        n_outputs: int,
        task: Literal["classification", "survival"] = "survival",
        dim: int = 256,
        dropout: float = 0.25,
        fusion: Fusion = "gated_concat",
        kron_dim: int = 32,
        rna_branch: StageOneRNA | dict[str, Any] | None = None,
        n_groups: int = 6,
        groups: list[list[int]] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(rna_branch, dict):  # a recorded config (`load_fusion_head`)
            rna_branch = StageOneRNA.from_config(rna_branch)
        if not modalities or set(modalities) - {"wsi", "rna"}:
            raise InvalidParameterError(f"modalities must be wsi and/or rna, got {modalities}")
        if fusion in ("kronecker", "mcat") and set(modalities) != {"wsi", "rna"}:
            raise InvalidParameterError(f"{fusion} fusion needs both modalities")
        if fusion == "mcat" and rna_branch is not None:
            raise InvalidParameterError("mcat fusion embeds gene groups with its own SNNs (rna_encoder: snn)")
        self.config: dict[str, Any] = {
            "modalities": list(modalities),
            "n_features": n_features,
            "n_genes": n_genes,
            "n_outputs": n_outputs,
            "task": task,
            "dim": dim,
            "dropout": dropout,
            "fusion": fusion,
            "kron_dim": kron_dim,
            "n_groups": n_groups,
            "groups": [list(g) for g in groups] if groups is not None else None,  # mcat: explicit gene groups
            "rna_branch": rna_branch.config if isinstance(rna_branch, StageOneRNA) else None,
        }
        self.modalities, self.task, self.fusion = tuple(modalities), task, fusion
        self.pretrained: list[nn.Parameter] = []
        self.wsi = ABMIL(n_features, 1, dim=dim, dropout=dropout) if "wsi" in modalities else None
        self.rna: nn.Module | None = None
        self.mcat: MCATFusion | None = None
        if fusion == "mcat":  # one module owns both branches: the slide side is guided by the gene groups
            self.wsi = None
            chosen = groups if groups is not None else gene_groups(n_genes, n_groups)
            if not chosen or any(not g or min(g) < 0 or max(g) >= n_genes for g in chosen):
                raise InvalidParameterError(f"mcat gene groups must be non-empty lists of indices below {n_genes}")
            self.mcat = MCATFusion(n_features, chosen, dim, dropout)
        elif "rna" in modalities:
            self.rna = rna_branch if rna_branch is not None else snn(n_genes, dim, dropout)
            if isinstance(rna_branch, StageOneRNA):
                self.pretrained = [*rna_branch.encoder.parameters(), *rna_branch.proj.parameters()]
        n = len(modalities)
        if fusion in ("gated_concat", "mcat"):
            self.gates = nn.ModuleDict({m: nn.Linear(n * dim, dim) for m in modalities})
            self.outs = nn.ModuleDict({m: nn.Linear(dim, n_outputs, bias=False) for m in modalities})
            self.bias = nn.Parameter(torch.zeros(n_outputs))
        else:
            self.reduce = nn.ModuleDict({m: nn.Sequential(nn.Linear(dim, kron_dim), nn.ReLU()) for m in modalities})
            self.post = nn.Sequential(
                nn.Dropout(dropout), nn.Linear((kron_dim + 1) ** 2, dim), nn.ReLU(), nn.Linear(dim, n_outputs)
            )

    def output_bias(self) -> torch.Tensor:
        """The bias a survival head starts at the marginal hazards (`init_output`)."""
        return self.post[-1].bias if self.fusion == "kronecker" else self.bias

    @torch.no_grad()
    def init_output(self, bias: torch.Tensor) -> None:
        """Zero the output weights and set the bias (a survival head then starts at the population hazards)."""
        if self.fusion == "kronecker":
            self.post[-1].weight.zero_()
        else:
            for lin in self.outs.values():
                lin.weight.zero_()
        self.output_bias().copy_(bias)

    def param_groups(self, lr: float, lr_pretrained: float) -> list[dict[str, Any]]:
        old = {id(p) for p in self.pretrained}
        groups = [{"params": [p for p in self.parameters() if id(p) not in old], "lr": lr}]
        if self.pretrained:
            groups.append({"params": self.pretrained, "lr": lr_pretrained})
        return groups

    def forward(self, features: torch.Tensor | None, rna: torch.Tensor | None) -> HeadOutput:
        h: dict[str, torch.Tensor] = {}
        attention = torch.zeros(1, 0)
        if self.wsi is not None:
            if features is None:
                raise InvalidParameterError("this head needs the slide's features")
            out = self.wsi(features)
            h["wsi"], attention = out.embedding, out.attention
        if self.rna is not None:
            if rna is None:
                raise InvalidParameterError("this head needs an RNA profile")
            h["rna"] = self.rna(rna)
        if self.mcat is not None:
            if features is None or rna is None:
                raise InvalidParameterError("mcat fusion needs the slide's features and an RNA profile")
            h["wsi"], h["rna"], attention = self.mcat(features, rna)
        contributions: dict[str, torch.Tensor] = {}
        if self.fusion == "mcat":
            for m in self.modalities:
                contributions[m] = self.outs[m](h[m])
            logits = sum(contributions.values()) + self.bias
        elif self.fusion == "gated_concat":
            both = torch.cat([h[m] for m in self.modalities], dim=-1)
            for m in self.modalities:
                contributions[m] = self.outs[m](torch.sigmoid(self.gates[m](both)) * h[m])
            logits = sum(contributions.values()) + self.bias
        else:
            a, b = (self.reduce[m](h[m]) for m in ("wsi", "rna"))
            one = torch.ones(a.shape[0], 1, dtype=a.dtype)
            a, b = torch.cat([a, one], -1), torch.cat([b, one], -1)
            logits = self.post(torch.einsum("bi,bj->bij", a, b).flatten(1))
        emb = torch.cat([h[m] for m in self.modalities], dim=-1)
        result = HeadOutput(logits=logits, attention=attention, embedding=emb)
        result.contributions = contributions  # type: ignore[attr-defined]
        if self.task == "survival":
            result.hazards, result.survival = hazards_and_survival(logits)
            result.risk = risk_from_survival(result.survival)
        return result
