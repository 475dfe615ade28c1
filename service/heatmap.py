"""Attention heatmap over the slide thumbnail, with a colour legend.

Pathologists read heatmaps at a glance, so the scale must be explicit: scores are min-max normalised per
slide (the legend says so) and only patches that were analysed are coloured; the rest of the slide stays
visible underneath, so a reader can tell "low attention" from "not analysed".
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from service.atomic import atomic_path
from service.errors import InvalidParameterError

if TYPE_CHECKING:
    from service.slides.base import SlideReader
    from service.slides.grid import TileGrid


def score_map(grid: TileGrid, scores: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise per-patch scores onto an image of `shape` (h, w) covering level 0.

    Returns (mean score per pixel, coverage mask). Overlapping patches are averaged."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.shape[0] != len(grid):
        raise InvalidParameterError(f"{scores.shape[0]} scores for {len(grid)} patches")
    h, w = shape
    acc = np.zeros((h, w), np.float64)
    cnt = np.zeros((h, w), np.float64)
    sx, sy = w / grid.level0_width, h / grid.level0_height
    size = grid.patch_size_level0
    for (x, y), s in zip(np.asarray(grid.coords), scores, strict=True):
        x0, y0 = int(x * sx), int(y * sy)
        x1, y1 = max(x0 + 1, round((x + size) * sx)), max(y0 + 1, round((y + size) * sy))
        acc[y0:y1, x0:x1] += s
        cnt[y0:y1, x0:x1] += 1
    covered = cnt > 0
    out = np.zeros_like(acc)
    out[covered] = acc[covered] / cnt[covered]
    return out, covered


def render_heatmap(
    path: str | Path,
    reader: SlideReader,
    grid: TileGrid,
    scores: np.ndarray,
    *,
    title: str = "Attention",
    max_side: int = 1024,
    alpha: float = 0.55,
    cmap: str = "inferno",
) -> Path:
    """Write a PNG: thumbnail, per-patch scores overlaid, and a colour bar labelled with the normalisation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import colormaps

    thumb = np.asarray(reader.thumbnail(max_side))
    h, w = thumb.shape[:2]
    values, covered = score_map(grid, scores, (h, w))
    lo, hi = (float(values[covered].min()), float(values[covered].max())) if covered.any() else (0.0, 1.0)
    norm = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    rgba = colormaps[cmap](norm)
    overlay = thumb.astype(np.float64) / 255.0
    a = np.where(covered, alpha, 0.0)[..., None]
    blended = overlay * (1 - a) + rgba[..., :3] * a

    dpi = 100
    fig_w = max(4.0, w / dpi + 1.6)
    fig, ax = plt.subplots(figsize=(fig_w, max(3.0, h / dpi + 0.6)), dpi=dpi)
    ax.imshow(blended)
    ax.set_axis_off()
    ax.set_title(f"{title} ({len(grid)} patches)", fontsize=9)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=matplotlib.colors.Normalize(0, 1))
    bar = fig.colorbar(sm, ax=ax, fraction=0.046, pad=0.02)
    bar.set_label("relative score (min-max per slide)", fontsize=8)
    bar.set_ticks([0, 0.5, 1])
    bar.set_ticklabels(["low", "mid", "high"])
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    return path
