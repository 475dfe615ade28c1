"""Patch grid at a target µm/px: which pyramid level to read, how many pixels, and which patches hold tissue.

Scale is physical (µm/px), never "magnification". The native level within `mpp_tolerance` of the target is
read as is; otherwise the nearest *finer* level is read at a larger size and area-resized down, so no pixel
is ever invented. A slide whose level 0 is coarser than the target is refused unless the caller allows
upsampling.

Tissue fraction per patch is computed for all candidates at once from the integral image of the mask
(bilinear lookups give the exact covered area even when patch edges fall inside mask pixels), so gridding a
gigapixel slide costs milliseconds beyond reading its thumbnail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from service.errors import InvalidParameterError, NoTissueError
from service.slides.mpp import require_mpp
from service.slides.tissue import TissueMask, TissueParams, tissue_mask

if TYPE_CHECKING:
    from service.slides.base import SlideReader


MIN_PATCH, MAX_PATCH = 8, 4096
MAX_READ = 8192  # px read per patch side before resizing: bounds memory when a slide lacks a coarse level


@dataclass(frozen=True)
class LevelChoice:
    read_level: int
    read_size: int  # px read at read_level per patch (before resizing to patch_size)
    level_downsample: float
    level_mpp: float
    effective_mpp: float  # µm per output pixel actually delivered
    upsampled: bool


@dataclass(frozen=True, eq=False)
class TileGrid:
    """Where the patches are and how to read them; `coords` are level-0 top-left (x, y)."""

    coords: np.ndarray = field(repr=False)  # int64 [N, 2]
    patch_size: int  # output px per side
    patch_size_level0: int  # level-0 px per side covered by one patch
    step_level0: int  # level-0 px between neighbouring patches (patch_size_level0 minus overlap)
    target_mpp: float
    effective_mpp: float
    read_level: int
    read_size: int
    level_downsample: float
    level0_width: int
    level0_height: int
    mpp_source: str
    mpp: float  # level-0 µm/px used
    overlap: int  # output px shared by neighbours
    tissue_threshold: float
    tissue_fraction: np.ndarray = field(repr=False)  # float32 [N], same order as coords
    mask: TissueMask | None = field(default=None, repr=False)  # mask + thumbnail (for previews)
    n_candidates: int = 0
    region: Any = field(default=None, repr=False)  # shapely geometry of a region of interest, when one was given
    region_info: dict | None = None  # what the region filter did (bounds, area, tissue patches before it)

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    @property
    def needs_resize(self) -> bool:
        return self.read_size != self.patch_size

    def summary(self) -> dict:
        return {
            "patches": len(self),
            "candidates": self.n_candidates,
            "patch_size": self.patch_size,
            "patch_size_level0": self.patch_size_level0,
            "target_mpp": self.target_mpp,
            "effective_mpp": round(self.effective_mpp, 5),
            "read_level": self.read_level,
            "read_size": self.read_size,
            "level0": [self.level0_width, self.level0_height],
            "mpp_source": self.mpp_source,
            **({"region": self.region_info} if self.region_info else {}),
        }


def choose_level(
    level_downsamples: tuple[float, ...] | list[float],
    mpp0: float,
    target_mpp: float,
    patch_size: int,
    *,
    tolerance: float = 0.05,
    allow_upsample: bool = False,
) -> LevelChoice:
    """Native level within `tolerance` (relative) of the target if any (the closest), else the nearest finer
    level read larger and resized down. Level 0 coarser than the target: refused unless `allow_upsample`."""
    if not (target_mpp > 0 and math.isfinite(target_mpp)):
        raise InvalidParameterError(f"target µm/px must be a positive number, got {target_mpp}")
    if not MIN_PATCH <= patch_size <= MAX_PATCH:
        raise InvalidParameterError(f"patch size must be {MIN_PATCH}-{MAX_PATCH} px, got {patch_size}")
    if not 0 <= tolerance < 1:
        raise InvalidParameterError(f"µm/px tolerance must be in [0, 1), got {tolerance}")
    mpps = [mpp0 * float(d) for d in level_downsamples]
    within = [i for i, m in enumerate(mpps) if abs(m / target_mpp - 1.0) <= tolerance]
    if within:
        lvl = min(within, key=lambda i: abs(mpps[i] / target_mpp - 1.0))
        return LevelChoice(lvl, patch_size, float(level_downsamples[lvl]), mpps[lvl], mpps[lvl], False)
    finer = [i for i, m in enumerate(mpps) if m < target_mpp]
    if finer:
        lvl = max(finer, key=lambda i: mpps[i])
        upsampled = False
    else:
        lvl = min(range(len(mpps)), key=lambda i: mpps[i])
        if not allow_upsample:
            raise InvalidParameterError(
                f"the slide's finest level is {mpps[lvl]:.3f} µm/px, coarser than the requested "
                f"{target_mpp} µm/px (beyond the {tolerance:.0%} tolerance); ask for a coarser µm/px "
                "or explicitly allow upsampling"
            )
        upsampled = True
    read_size = max(1, round(patch_size * target_mpp / mpps[lvl]))
    if read_size > MAX_READ:
        raise InvalidParameterError(
            f"{target_mpp} µm/px would need {read_size} px read per patch from the nearest finer level "
            f"({mpps[lvl]:.3f} µm/px); the slide has no pyramid level close enough (limit {MAX_READ} px)"
        )
    effective = mpps[lvl] * read_size / patch_size
    return LevelChoice(lvl, read_size, float(level_downsamples[lvl]), mpps[lvl], effective, upsampled)


def _box_area(integral: np.ndarray, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray) -> np.ndarray:
    """Exact area of a piecewise-constant mask over real-valued boxes: the continuous integral image is
    bilinear inside each cell, so bilinear interpolation of the discrete one is exact."""

    def at(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        h1, w1 = integral.shape
        x = np.clip(x, 0.0, w1 - 1.0)
        y = np.clip(y, 0.0, h1 - 1.0)
        xi = np.minimum(np.floor(x).astype(np.int64), w1 - 2)
        yi = np.minimum(np.floor(y).astype(np.int64), h1 - 2)
        fx, fy = x - xi, y - yi
        a = integral[yi, xi]
        b = integral[yi, xi + 1]
        c = integral[yi + 1, xi]
        d = integral[yi + 1, xi + 1]
        return a * (1 - fx) * (1 - fy) + b * fx * (1 - fy) + c * (1 - fx) * fy + d * fx * fy

    return at(x1, y1) - at(x0, y1) - at(x1, y0) + at(x0, y0)


def tissue_fractions(mask: TissueMask, xs: np.ndarray, ys: np.ndarray, size_level0: int) -> np.ndarray:
    """Fraction of each level-0 box `[x, x+size) x [y, y+size)` covered by tissue (vectorised)."""
    integral = cv2.integral(mask.mask.astype(np.uint8), sdepth=cv2.CV_32S)  # 4 B/px; counts < 2**31
    sx, sy = mask.scale
    x0, y0 = xs * sx, ys * sy
    x1, y1 = (xs + size_level0) * sx, (ys + size_level0) * sy
    area = _box_area(integral, x0, y0, x1, y1)
    return (area / np.maximum((x1 - x0) * (y1 - y0), 1e-12)).astype(np.float32)


def build_grid(
    reader: SlideReader,
    *,
    target_mpp: float = 0.5,
    patch_size: int = 224,
    tissue_threshold: float = 0.25,
    overlap: int = 0,
    mpp_tolerance: float = 0.05,
    allow_upsample: bool = False,
    tissue: TissueMask | None = None,
    tissue_params: TissueParams = TissueParams(),
) -> TileGrid:
    """Grid of patches with at least `tissue_threshold` tissue, row-major (y, then x), fully inside level 0.

    `overlap` is in output pixels shared by neighbouring patches. Raises `MissingMppError` for a slide without
    µm/px (open it with an override), `InvalidParameterError` for impossible parameters, and `NoTissueError`
    when no tissue is found or no patch reaches the threshold (an empty grid is never returned).
    """
    patch_size = int(patch_size)
    overlap = int(overlap)
    if not 0.0 <= tissue_threshold <= 1.0:
        raise InvalidParameterError(f"tissue threshold must be in [0, 1], got {tissue_threshold}")
    if not 0 <= overlap < patch_size:
        raise InvalidParameterError(f"overlap must be in [0, patch size {patch_size}), got {overlap}")
    mpp = require_mpp(reader)
    mpp0 = mpp.mean
    choice = choose_level(
        reader.level_downsamples,
        mpp0,
        target_mpp,
        patch_size,
        tolerance=mpp_tolerance,
        allow_upsample=allow_upsample,
    )
    w0, h0 = (int(v) for v in reader.dimensions)
    size0 = max(1, round(choice.read_size * choice.level_downsample))
    step0 = max(1, round(size0 * (patch_size - overlap) / patch_size))
    if tissue is None:
        tissue = tissue_mask(reader, mpp=mpp0, params=tissue_params)

    xs = np.arange(0, w0 - size0 + 1, step0, dtype=np.int64)
    ys = np.arange(0, h0 - size0 + 1, step0, dtype=np.int64)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")  # row-major: y outer, x inner
    gx, gy = gx.ravel(), gy.ravel()
    n_candidates = int(gx.size)
    if n_candidates:
        frac = tissue_fractions(tissue, gx.astype(np.float64), gy.astype(np.float64), size0)
        keep = frac >= max(tissue_threshold, 1e-6)  # a threshold of 0 still means "some tissue"
    else:
        frac = np.zeros(0, np.float32)
        keep = np.zeros(0, bool)
    coords = np.stack([gx[keep], gy[keep]], axis=1).astype(np.int64).reshape(-1, 2)
    if len(coords) == 0:
        raise NoTissueError(
            f"tissue was found ({tissue.tissue_fraction:.1%} of the thumbnail) but no {patch_size} px patch at "
            f"{target_mpp} µm/px has ≥ {tissue_threshold:.0%} tissue ({n_candidates} candidates); "
            "lower the tissue threshold or the patch size",
            slide=getattr(getattr(reader, "path", None), "name", None),
        )
    return TileGrid(
        coords=coords,
        patch_size=patch_size,
        patch_size_level0=size0,
        step_level0=step0,
        target_mpp=float(target_mpp),
        effective_mpp=float(choice.effective_mpp),
        read_level=choice.read_level,
        read_size=choice.read_size,
        level_downsample=choice.level_downsample,
        level0_width=w0,
        level0_height=h0,
        mpp_source=mpp.source,
        mpp=mpp0,
        overlap=overlap,
        tissue_threshold=float(tissue_threshold),
        tissue_fraction=frac[keep],
        mask=tissue,
        n_candidates=n_candidates,
    )
