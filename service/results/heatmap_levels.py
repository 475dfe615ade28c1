"""Heatmaps re-rendered from saved per-patch scores at any pyramid level, without running a model.

The image is exactly the size of the requested pyramid level, so it lies on the slide pixel for pixel (a
viewer stretches it over the whole slide; `--slide` blends it over that level). Patches that were not analysed
stay transparent, so "low score" and "not analysed" never look alike. Scores are min-max normalised per slide,
as in `heatmap.png`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.atomic import atomic_path
from service.errors import InvalidParameterError
from service.results.patch_scores import PatchScores

MAX_PIXELS = 64_000_000  # 256 MB of RGBA: ask for a coarser level beyond this
OVERLAY_PIXELS = 16_000_000  # the API's default level for a browser overlay: the finest at most this size
DEFAULT_ALPHA = 0.6


def score_names(scores: PatchScores) -> list[str]:
    """What can be drawn: `attention`, `<head>.attention`, `<head>.<label>`."""
    names = ["attention"] if scores.attention is not None else []
    for h in scores.heads:
        if h.attention is not None:
            names.append(f"{h.name}.attention")
        names += [f"{h.name}.{lab}" for lab in (h.labels or [])] if h.probabilities is not None else []
    return names


def pick_scores(scores: PatchScores, name: str = "attention") -> np.ndarray:
    if name == "attention" and scores.attention is not None:
        return scores.attention
    head, _, what = name.partition(".")
    for h in scores.heads:
        if h.name != head:
            continue
        if what == "attention" and h.attention is not None:
            return h.attention
        if h.probabilities is not None and what in (h.labels or []):
            return h.probabilities[:, (h.labels or []).index(what)]
    raise InvalidParameterError(f"no score {name!r} in this result; choose from {score_names(scores)}")


def level_size(level_dimensions: list, level: int) -> tuple[int, int]:
    if not isinstance(level, int) or not 0 <= level < len(level_dimensions):
        raise InvalidParameterError(f"level must be 0-{len(level_dimensions) - 1} for this slide, got {level}")
    w, h = (int(v) for v in level_dimensions[level])
    if w * h > MAX_PIXELS:
        raise InvalidParameterError(
            f"level {level} is {w}x{h} px, over the {MAX_PIXELS // 1_000_000} MP limit; ask for a coarser level"
        )
    return w, h


def normalised_map(
    scores: PatchScores, values: np.ndarray, level0: tuple[int, int], size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """(min-max normalised mean score per pixel, coverage) on a `size` (w, h) canvas covering level 0."""
    w, h = size
    acc = np.zeros((h, w), np.float32)
    cnt = np.zeros((h, w), np.uint16)
    sx, sy = w / level0[0], h / level0[1]
    s = scores.patch_size_level0
    v = np.asarray(values, np.float64).reshape(-1)
    lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 1.0)
    norm = (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
    for (x, y), val in zip(scores.coords.tolist(), norm.tolist(), strict=True):
        x0, y0 = int(x * sx), int(y * sy)
        x1, y1 = max(x0 + 1, round((x + s) * sx)), max(y0 + 1, round((y + s) * sy))
        acc[y0:y1, x0:x1] += val
        cnt[y0:y1, x0:x1] += 1
    covered = cnt > 0
    acc[covered] /= cnt[covered]
    return acc, covered


def render_rgba(
    scores: PatchScores,
    level_dimensions: list,
    level: int,
    *,
    score: str = "attention",
    cmap: str = "inferno",
    alpha: float = DEFAULT_ALPHA,
    background: np.ndarray | None = None,
) -> np.ndarray:
    """uint8 [h, w, 4] at `level`: coloured where analysed, transparent elsewhere; blended over `background`
    (RGB at the same level) when given, then opaque."""
    from matplotlib import colormaps

    if not 0.0 <= alpha <= 1.0:
        raise InvalidParameterError(f"alpha must be in [0, 1], got {alpha}")
    w, h = level_size(level_dimensions, level)
    level0 = (int(level_dimensions[0][0]), int(level_dimensions[0][1]))
    values, covered = normalised_map(scores, pick_scores(scores, score), level0, (w, h))
    rgba = (colormaps[cmap](values)[..., :3] * 255.0).astype(np.float32)
    a = np.where(covered, alpha, 0.0).astype(np.float32)[..., None]
    if background is None:
        return np.concatenate([rgba, a * 255.0], axis=2).round().astype(np.uint8)
    bg = np.asarray(background, np.float32)[:h, :w, :3]
    out = bg * (1.0 - a) + rgba * a
    return np.concatenate([out, np.full((h, w, 1), 255.0, np.float32)], axis=2).round().astype(np.uint8)


def png_bytes(rgba: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG", optimize=False, compress_level=3)
    return buf.getvalue()


def write_png(path: str | Path, rgba: np.ndarray) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(png_bytes(rgba))
    return path
