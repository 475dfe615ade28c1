"""Stage-1 losses: masked symmetric InfoNCE between modality pairs and batch-hard triplet over cancer types.

Decisions (method reference §7): each pairwise InfoNCE uses only rows where both modalities exist (§7.2a); one
learnable temperature shared by all pairs, CLIP init 1/0.07, logits scale clamped at 100 (§7.4); the triplet
distance is the L2 distance of the concatenated per-modality L2-normalised embeddings, summed only over the
modalities both samples have (equal to the plain concatenation when nothing is missing, §7.2b).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

MAX_LOGIT_SCALE = 100.0


def masked_clip_loss(
    a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor | None:
    """Symmetric InfoNCE between rows of `a` and `b` where `mask`; None when fewer than 2 pairs exist."""
    idx = mask.nonzero().squeeze(1)
    if idx.numel() < 2:
        return None
    a = F.normalize(a[idx], dim=-1)
    b = F.normalize(b[idx], dim=-1)
    scale = logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
    logits = scale * a @ b.t()
    target = torch.arange(idx.numel(), device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def batch_hard_triplet(
    embeddings: list[torch.Tensor], present: list[torch.Tensor], labels: torch.Tensor, margin: float = 0.3
) -> torch.Tensor | None:
    """Batch-hard triplet loss: farthest positive vs nearest negative per anchor, hinge at `margin`.

    `embeddings[m]` `[B, D]` per modality, `present[m]` `[B]` bool. None when no anchor has both a positive and a
    negative in the batch.
    """
    d2 = 0.0
    for emb, pres in zip(embeddings, present, strict=True):
        e = F.normalize(emb, dim=-1)
        both = (pres[:, None] & pres[None, :]).to(e.dtype)
        d2 = d2 + both * (e[:, None, :] - e[None, :, :]).pow(2).sum(-1)
    n = labels.shape[0]
    dist = (d2 + 1e-12).sqrt()
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(n, dtype=torch.bool, device=labels.device)
    pos = same & ~eye
    neg = ~same
    valid = pos.any(1) & neg.any(1)
    if not bool(valid.any()):
        return None
    hardest_pos = dist.masked_fill(~pos, float("-inf")).amax(1)
    hardest_neg = dist.masked_fill(~neg, float("inf")).amin(1)
    return F.relu(hardest_pos - hardest_neg + margin)[valid].mean()


@dataclass
class LossWeights:
    slide_report: float = 1.0
    slide_rna: float = 1.0
    report_rna: float = 1.0
    triplet: float = 1.0
    margin: float = 0.3


def mstar_loss(
    slide: torch.Tensor,
    report: torch.Tensor | None,
    rna: torch.Tensor | None,
    has_report: torch.Tensor,
    has_rna: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: torch.Tensor,
    w: LossWeights,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total = weighted mean of the available pairwise InfoNCE terms + `w.triplet` x triplet.

    Inputs are the *global* batch (already gathered across ranks). Returns the loss and its parts for logging.
    """
    parts: dict[str, torch.Tensor] = {}
    weights: dict[str, float] = {}
    if report is not None and w.slide_report > 0:
        term = masked_clip_loss(slide, report, has_report, logit_scale)
        if term is not None:
            parts["slide_report"], weights["slide_report"] = term, w.slide_report
    if rna is not None and w.slide_rna > 0:
        term = masked_clip_loss(slide, rna, has_rna, logit_scale)
        if term is not None:
            parts["slide_rna"], weights["slide_rna"] = term, w.slide_rna
    if report is not None and rna is not None and w.report_rna > 0:
        term = masked_clip_loss(report, rna, has_report & has_rna, logit_scale)
        if term is not None:
            parts["report_rna"], weights["report_rna"] = term, w.report_rna
    total = slide.new_zeros(())
    if parts:
        total = sum(weights[k] * parts[k] for k in parts) / sum(weights.values())
        parts["contrastive"] = total
    if w.triplet > 0:
        embs, pres = [slide], [torch.ones_like(has_report)]
        if report is not None:
            embs.append(report)
            pres.append(has_report)
        if rna is not None:
            embs.append(rna)
            pres.append(has_rna)
        trip = batch_hard_triplet(embs, pres, labels, w.margin)
        if trip is not None:
            parts["triplet"] = trip
            total = total + w.triplet * trip
    logs = {k: float(v.detach()) for k, v in parts.items()}
    logs["loss"] = float(total.detach())
    logs["logit_scale"] = float(logit_scale.detach().exp())
    return total, logs
