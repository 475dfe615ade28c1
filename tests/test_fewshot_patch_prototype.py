"""The official few-shot variant (§3.5): top-100 zero-shot-scored support patches -> prototypes, MI-Zero pooling."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from service.errors import InvalidParameterError
from training.downstream.fewshot import mi_zero_pool, patch_prototype_curves, patch_prototypes


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_prototype_is_mean_of_top100_by_own_class_logit() -> None:
    rng = np.random.default_rng(0)
    support = [_unit(rng.normal(size=(n, 16))).astype(np.float32) for n in (80, 70, 90, 60, 30)]
    sy = np.array([0, 1, 0, 1, 0])
    w = _unit(rng.normal(size=(2, 16))).astype(np.float32)
    protos = patch_prototypes(support, sy, w)
    for c in range(2):
        pool = np.concatenate([s for s, y in zip(support, sy, strict=True) if y == c])
        order = np.argsort(pool @ w[c])[::-1]
        expected = pool[order[:100]].mean(0)
        assert np.allclose(protos[c], expected, atol=1e-6)
        # not the mean of all patches, not selected by the other class's logit, not renormalised
        assert not np.allclose(protos[c], pool.mean(0), atol=1e-3)
        assert not np.allclose(protos[c], pool[np.argsort(pool @ w[1 - c])[::-1][:100]].mean(0), atol=1e-3)
        assert np.linalg.norm(protos[c]) < 0.9
        # the selected patches score at least as high as every patch left out
        sel = pool[order[:100]] @ w[c]
        assert sel.min() >= (pool[order[100:]] @ w[c]).max()
    # fewer than 100 support patches: all of them
    small = patch_prototypes(support[3:4] + support[4:5], np.array([1, 0]), w)
    assert np.allclose(small[0], support[4].mean(0), atol=1e-6) and np.allclose(small[1], support[3].mean(0), atol=1e-6)
    with pytest.raises(InvalidParameterError, match="no support"):
        patch_prototypes(support[:1], np.array([0]), w)


def test_mi_zero_pool_against_prototypes() -> None:
    protos = np.eye(3, 4, dtype=np.float32)
    patches = np.array([[1, 0, 0, 0], [0.9, 0.1, 0, 0], [0, 1, 0, 0], [0, 0, 0.2, 1]], np.float32)
    s = mi_zero_pool(patches, protos, [1, 2, 4])
    assert np.allclose(s[1], [1.0, 1.0, 0.2])
    assert np.allclose(s[2], [0.95, 0.55, 0.1])
    assert np.allclose(s[4], (patches @ protos.T).mean(0))


SHIFT = 1.0  # per-slide shift of the tumour patches: one support slide gives a biased prototype


def _patch_cohort(rng, n_per_class: int, w_noise: float, dim: int = 32, n_classes: int = 3):
    """Slides of 150 patches: 30 tumour patches near the class direction (plus a per-slide shift) and 120
    background patches from clusters shared by every class. The text classifier is the class direction plus
    noise, so zero-shot logits point at the tumour patches but imperfectly. With k = 1 the top 100 patches of
    one slide are mostly background; with more slides they are tumour, and the shifts average out."""
    u = _unit(rng.normal(size=(n_classes, dim)))
    background = _unit(rng.normal(size=(4, dim)))
    classifier = _unit(u + w_noise * rng.normal(size=u.shape) / np.sqrt(dim))

    def slide(c: int) -> np.ndarray:
        shift = SHIFT * rng.normal(size=dim) / np.sqrt(dim)
        tumour = u[c] + shift + 0.6 * rng.normal(size=(30, dim)) / np.sqrt(dim)
        bg = background[rng.integers(0, 4, 120)] + 0.6 * rng.normal(size=(120, dim)) / np.sqrt(dim)
        return np.concatenate([tumour, bg]).astype(np.float32)

    ys = np.repeat(np.arange(n_classes), n_per_class)
    return [slide(c) for c in ys], ys, classifier


def test_patch_prototype_rises_with_k_when_zero_shot_points_at_tumour() -> None:
    slides, ys, w = _patch_cohort(np.random.default_rng(3), 36, w_noise=2.0)
    tr_idx = np.concatenate([np.flatnonzero(ys == c)[:16] for c in range(3)])
    te_idx = np.setdiff1d(np.arange(len(ys)), tr_idx)
    train, ty = [slides[i] for i in tr_idx], ys[tr_idx]
    test, qy = [slides[i] for i in te_idx], ys[te_idx]
    shots = [1, 2, 4, 8, 16]
    curves = patch_prototype_curves(train, ty, {"test": (test, qy)}, w, shots, [5], repeats=5, seed=0)
    acc = [curves["test"]["5"][str(k)]["balanced_accuracy_mean"] for k in shots]
    assert acc[-1] > 0.9 and acc[-1] > acc[0] + 0.15, acc
    assert all(b > a - 0.05 for a, b in itertools.pairwise(acc)), acc
    # the top-100 selection is what makes large k work: with a text classifier that points at nothing the
    # prototypes fill with shared background and k = 16 is far worse
    blind = _unit(np.random.default_rng(9).normal(size=w.shape))
    curves_blind = patch_prototype_curves(train, ty, {"test": (test, qy)}, blind, [16], [5], repeats=5, seed=0)
    assert curves_blind["test"]["5"]["16"]["balanced_accuracy_mean"] < acc[-1] - 0.15
