"""Preview PNG: the slide thumbnail with the tissue contour and the kept patches drawn on it, so a person can
check in one glance what was segmented and tiled (the first thing to look at when a tile count surprises)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from service.errors import InvalidParameterError

if TYPE_CHECKING:
    from service.slides.base import SlideReader
    from service.slides.grid import TileGrid

CONTOUR_RGB = (0, 200, 0)
PATCH_RGB = (30, 80, 255)


def render_preview(grid: TileGrid, reader: SlideReader | None = None, max_side: int = 1024) -> np.ndarray:
    """uint8 RGB preview. With `reader`, a sharper thumbnail (longer side ≤ `max_side`) is read; otherwise the
    mask's own thumbnail is enlarged (nearest neighbour) up to `max_side`."""
    if grid.mask is None:
        raise InvalidParameterError("this grid carries no tissue mask to draw")
    mask = grid.mask
    w0, h0 = grid.level0_width, grid.level0_height
    if reader is not None:
        base = np.ascontiguousarray(reader.thumbnail(min(max_side, max(w0, h0))))
    else:
        f = max(1, int(max_side // max(mask.thumbnail.shape[:2])))
        base = cv2.resize(mask.thumbnail, None, fx=f, fy=f, interpolation=cv2.INTER_NEAREST)
    h, w = base.shape[:2]
    canvas = np.ascontiguousarray(base.copy())
    mask_up = cv2.resize(mask.mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(mask_up, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    thick = max(1, round(max(w, h) / 600))
    cv2.drawContours(canvas, contours, -1, CONTOUR_RGB, thick)
    sx, sy = w / w0, h / h0
    size = grid.patch_size_level0
    for x, y in np.asarray(grid.coords):
        p0 = (round(x * sx), round(y * sy))
        p1 = (round((x + size) * sx) - 1, round((y + size) * sy) - 1)
        cv2.rectangle(canvas, p0, p1, PATCH_RGB, 1)
    return canvas


def write_preview(path: str | Path, grid: TileGrid, reader: SlideReader | None = None, max_side: int = 1024) -> Path:
    path = Path(path)
    image = render_preview(grid, reader, max_side=max_side)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise InvalidParameterError(f"cannot write preview image {path} (use a .png path)")
    return path
