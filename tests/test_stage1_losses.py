"""Stage-1 losses against direct re-computations: masked InfoNCE, batch-hard triplet, missing modalities."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from training.losses import LossWeights, batch_hard_triplet, masked_clip_loss, mstar_loss


def _clip_reference(a, b, scale):
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    n = a.shape[0]
    total = 0.0
    for i in range(n):
        row = [scale * float(a[i] @ b[j]) for j in range(n)]
        col = [scale * float(b[i] @ a[j]) for j in range(n)]
        total += -(row[i] - math.log(sum(math.exp(v) for v in row)))
        total += -(col[i] - math.log(sum(math.exp(v) for v in col)))
    return total / (2 * n)


def test_masked_clip_loss_uses_only_complete_pairs():
    torch.manual_seed(0)
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    mask = torch.tensor([True, False, True, True, False, True])
    scale = torch.tensor(math.log(1 / 0.07))
    got = masked_clip_loss(a, b, mask, scale)
    assert math.isclose(float(got), _clip_reference(a[mask], b[mask], 1 / 0.07), rel_tol=1e-5)
    # rows without a pair do not influence the loss
    b2 = b.clone()
    b2[1] = 100.0
    assert float(masked_clip_loss(a, b2, mask, scale)) == float(got)
    assert masked_clip_loss(a, b, torch.tensor([True, False, False, False, False, False]), scale) is None
    # logit scale is clamped at 100
    big = masked_clip_loss(a, b, mask, torch.tensor(10.0))
    assert math.isclose(float(big), _clip_reference(a[mask], b[mask], 100.0), rel_tol=1e-5)


def test_batch_hard_triplet_brute_force():
    torch.manual_seed(1)
    s, r = torch.randn(8, 5), torch.randn(8, 5)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3])  # label 3 has no positive -> not an anchor
    got = batch_hard_triplet([s, r], [torch.ones(8, dtype=torch.bool)] * 2, labels, margin=0.3)
    cat = torch.cat([F.normalize(s, dim=-1), F.normalize(r, dim=-1)], dim=1)
    losses = []
    for i in range(8):
        pos = [float((cat[i] - cat[j]).norm()) for j in range(8) if j != i and labels[j] == labels[i]]
        neg = [float((cat[i] - cat[j]).norm()) for j in range(8) if labels[j] != labels[i]]
        if pos and neg:
            losses.append(max(0.0, max(pos) - min(neg) + 0.3))
    assert math.isclose(float(got), sum(losses) / len(losses), rel_tol=1e-5)


def test_triplet_distance_skips_missing_modalities():
    torch.manual_seed(2)
    s, r = torch.randn(4, 5), torch.randn(4, 5)
    labels = torch.tensor([0, 0, 1, 1])
    present = torch.tensor([True, False, True, True])
    r_noise = r.clone()
    r_noise[1] = torch.randn(5) * 50  # a missing report's placeholder embedding must not matter
    a = batch_hard_triplet([s, r], [torch.ones(4, dtype=torch.bool), present], labels)
    b = batch_hard_triplet([s, r_noise], [torch.ones(4, dtype=torch.bool), present], labels)
    assert float(a) == float(b)
    assert batch_hard_triplet([s], [torch.ones(4, dtype=torch.bool)], torch.tensor([0, 1, 2, 3])) is None


def test_total_loss_combines_available_terms_and_backpropagates():
    torch.manual_seed(3)
    s = torch.randn(6, 8, requires_grad=True)
    r, g = torch.randn(6, 8), torch.randn(6, 8)
    has_r = torch.tensor([True] * 6)
    has_g = torch.tensor([True, True, False, False, False, False])
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    w = LossWeights(slide_report=1, slide_rna=3, report_rna=1, triplet=0.5)
    total, logs = mstar_loss(s, r, g, has_r, has_g, labels, scale, w)
    parts = [k for k in ("slide_report", "slide_rna", "report_rna") if k in logs]
    assert parts == ["slide_report", "slide_rna", "report_rna"]
    expected = (logs["slide_report"] + 3 * logs["slide_rna"] + logs["report_rna"]) / 5 + 0.5 * logs["triplet"]
    assert math.isclose(logs["loss"], expected, rel_tol=1e-5)
    total.backward()
    assert s.grad is not None and scale.grad is not None
    # with a single RNA profile the RNA terms vanish and the weights renormalise
    _, logs1 = mstar_loss(s, r, g, has_r, torch.tensor([True] + [False] * 5), labels, scale, w)
    assert "slide_rna" not in logs1 and "report_rna" not in logs1
    assert math.isclose(logs1["contrastive"], logs1["slide_report"], rel_tol=1e-6)


def test_perfect_alignment_has_low_loss():
    e = torch.eye(4) * 3
    scale = torch.tensor(math.log(100.0))
    aligned = masked_clip_loss(e, e, torch.ones(4, dtype=torch.bool), scale)
    shuffled = masked_clip_loss(e, e[[1, 2, 3, 0]], torch.ones(4, dtype=torch.bool), scale)
    assert float(aligned) < 1e-3 < float(shuffled)
