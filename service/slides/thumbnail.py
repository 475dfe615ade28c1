"""Thumbnails built from the pyramid: read the coarsest level that still has enough pixels, in bounded
chunks, and box-filter each chunk down. Memory stays bounded even on single-level gigapixel slides. JPEG 2000
levels much finer than the thumbnail are decoded at a reduced wavelet resolution instead (one bounded image)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from service.errors import InvalidParameterError

if TYPE_CHECKING:
    from service.slides.base import SlideReader

CHUNK = 4096  # level pixels per chunk side


def thumbnail_size(dimensions: tuple[int, int], max_size: int) -> tuple[int, int]:
    """(w, h) with the longer side = min(max_size, longer side of the slide), aspect ratio kept."""
    w0, h0 = dimensions
    scale = min(1.0, max_size / max(w0, h0))
    return max(1, round(w0 * scale)), max(1, round(h0 * scale))


def best_level_for_downsample(reader: SlideReader, downsample: float) -> int:
    """Coarsest level whose downsample does not exceed `downsample` (never upsample)."""
    ds = reader.level_downsamples
    finer = [i for i, d in enumerate(ds) if d <= downsample * 1.0001] or [0]
    return max(finer, key=lambda i: ds[i])


def thumbnail_from_levels(reader: SlideReader, max_size: int) -> np.ndarray:
    """uint8 RGB `[h, w, 3]`, longer side ≤ `max_size`."""
    if int(max_size) < 1:
        raise InvalidParameterError(f"thumbnail size must be ≥ 1, got {max_size}")
    tw, th = thumbnail_size(reader.dimensions, int(max_size))
    w0, h0 = reader.dimensions
    level = best_level_for_downsample(reader, min(w0 / tw, h0 / th))
    lw, lh = reader.level_dimensions[level]
    ds = reader.level_downsamples[level]
    sx, sy = tw / lw, th / lh  # level px -> thumbnail px
    if max(sx, sy) < 0.5:  # JPEG 2000: decode the level at a coarser wavelet resolution, then box-filter
        from service.slides.fasttiles import reduced_j2k_image

        reduced = reduced_j2k_image(getattr(reader, "path", ""), lw, lh, max(sx, sy))
        if reduced is not None:
            return np.asarray(Image.fromarray(reduced).resize((tw, th), Image.Resampling.BOX))
    out = np.full((th, tw, 3), 255, dtype=np.uint8)
    for cy in range(0, lh, CHUNK):
        for cx in range(0, lw, CHUNK):
            cw, ch = min(CHUNK, lw - cx), min(CHUNK, lh - cy)
            x0, y0 = math.floor(cx * sx), math.floor(cy * sy)
            x1, y1 = min(tw, math.ceil((cx + cw) * sx)), min(th, math.ceil((cy + ch) * sy))
            if x1 <= x0 or y1 <= y0:
                continue
            # Read exactly the level pixels that map onto the target cells so chunk seams do not shift.
            rx0, ry0 = math.floor(x0 / sx), math.floor(y0 / sy)
            rx1, ry1 = min(lw, math.ceil(x1 / sx)), min(lh, math.ceil(y1 / sy))
            region = reader.read_region((round(rx0 * ds), round(ry0 * ds)), level, (rx1 - rx0, ry1 - ry0))
            small = Image.fromarray(region).resize((x1 - x0, y1 - y0), Image.Resampling.BOX)
            out[y0:y1, x0:x1] = np.asarray(small)
    return out
