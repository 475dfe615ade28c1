"""The Stage-1 multimodal model (slide aggregator, report and RNA encoders in one space) and its frozen views.

Module names follow the official Stage-1 checkpoint (`vision_encoder.*`, `text_encoder.bert.*`, `proj_text.*`,
`logit_scale`) plus `gene_encoder.*` / `proj_gene.*`, whose official names are unknown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from service.errors import InvalidParameterError

from .gene_encoder import GeneEncoder
from .text_encoder import TextEncoder
from .transmil import TransMIL


@dataclass
class MStarEmbeddings:
    """Unnormalised 512-d embeddings per modality (`None` when the batch has no such input)."""

    slide: torch.Tensor
    report: torch.Tensor | None
    rna: torch.Tensor | None


class MStar(nn.Module):
    def __init__(
        self,
        vision_encoder: TransMIL,
        text_encoder: TextEncoder | None,
        gene_encoder: GeneEncoder | None,
        init_temperature: float = 0.07,
        learn_temperature: bool = True,
    ) -> None:
        super().__init__()
        dim = vision_encoder.dim
        self.vision_encoder = vision_encoder
        self.text_encoder = text_encoder
        self.proj_text = nn.Linear(text_encoder.hidden_size, dim) if text_encoder is not None else None
        self.gene_encoder = gene_encoder
        self.proj_gene = nn.Linear(gene_encoder.dim, dim) if gene_encoder is not None else None
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)), requires_grad=learn_temperature)

    def forward(
        self,
        features: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rna_bins: torch.Tensor | None = None,
    ) -> MStarEmbeddings:
        slide = self.vision_encoder(features).embedding
        report = rna = None
        if self.text_encoder is not None and input_ids is not None:
            report = self.proj_text(self.text_encoder(input_ids, attention_mask))
        if self.gene_encoder is not None and rna_bins is not None:
            rna = self.proj_gene(self.gene_encoder(rna_bins))
        return MStarEmbeddings(slide=slide, report=report, rna=rna)


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


class Stage1Encoders(nn.Module):
    """The frozen Stage-1 aggregator, text encoder and `proj_text` (`training.checkpoints.load_stage1`)."""

    def __init__(self, vision: Stage1Vision, text: nn.Module | None, proj_text: nn.Module | None) -> None:
        super().__init__()
        self.vision, self.text, self.proj_text = vision, text, proj_text

    @torch.no_grad()
    def encode_text(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        if self.text is None or self.proj_text is None:
            raise InvalidParameterError("the Stage-1 checkpoint has no text encoder")
        out = []
        for i in range(0, len(texts), batch_size):
            tok = self.text.tokenize(texts[i : i + batch_size])
            out.append(self.proj_text(self.text(tok["input_ids"], tok["attention_mask"])))
        return torch.cat(out)
