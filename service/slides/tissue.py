"""Tissue mask on a low-resolution thumbnail at a fixed µm/px.

CLAM/wsinfer-style: one channel that separates tissue from glass (HSV saturation on bright-field slides,
brightness on fluorescence slides whose background is black), a median blur, Otsu's threshold (with a floor so
an empty slide is not split in two by noise), a morphological closing, and area filters expressed in µm² so
the result does not depend on the thumbnail scale. Computing at a fixed µm/px (default 8) keeps the cost
independent of the scanner's magnification: a 20,000 px square slide at 0.5 µm/px gives a 1,250 px mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

from service.errors import InvalidParameterError, NoTissueError

if TYPE_CHECKING:
    from service.slides.base import SlideReader

DEFAULT_MASK_MPP = 8.0
MAX_DIRECT_READ_PIXELS = 16_000_000  # one read_region of the mask level (64 MB RGBA in OpenSlide)


MAX_FILTER_SHARE = 0.01  # speck/hole filters never drop more than 1 % of the image per component


@dataclass(frozen=True)
class TissueParams:
    """Segmentation knobs; areas in µm² and lengths in µm so they mean the same at any thumbnail scale."""

    mask_mpp: float = DEFAULT_MASK_MPP
    median_um: float = 40.0  # median blur window (5 px at 8 µm/px; OpenCV's fast path stops at 5)
    close_um: float = 32.0  # closing kernel (4 px at 8 µm/px, CLAM's close)
    min_tissue_um2: float = 20_000.0  # drop specks smaller than ~140 µm square (dust, debris)
    min_hole_um2: float = 40_000.0  # fill holes smaller than ~200 µm square (lumina kept when larger)
    min_saturation: int = 15  # floor for Otsu on saturation (0-255): glass never counts as tissue
    min_brightness: int = 20  # floor for Otsu on brightness for dark-background (fluorescence) slides
    max_thumbnail_side: int = 4096  # caps mask memory on giant slides (coarser than mask_mpp then)
    min_thumbnail_side: int = 128  # small crops get a finer mask (at 8 µm/px a 0.5 mm crop is only 64 px)


@dataclass(frozen=True)
class TissueMask:
    """Boolean mask over a thumbnail; `scale` = mask px per level-0 px along (x, y)."""

    mask: np.ndarray  # bool [h, w]
    thumbnail: np.ndarray  # uint8 RGB [h, w, 3], the image the mask was computed on
    scale: tuple[float, float]
    mask_mpp: float  # µm per mask pixel (mean of x and y)
    background: str  # "bright" (H&E, IHC: glass is white) or "dark" (fluorescence: black)
    threshold: float  # the threshold applied on the feature channel (0-255)

    @property
    def tissue_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


def _odd(n: float) -> int:
    k = max(1, round(n))
    return k if k % 2 == 1 else k + 1


def detect_background(rgb: np.ndarray) -> str:
    """'dark' for fluorescence (black glass), else 'bright' (H&E, IHC: white glass).

    White glass anywhere (all three channels high, which fluorescence never shows over a large area) means
    bright-field even when the scan has black borders; otherwise the border ring decides (tissue may fill most
    of a crop, glass dominates its edge), and the whole image only when the ring is ambiguous.
    """
    h, w = rgb.shape[:2]
    rgb = np.ascontiguousarray(rgb)
    darkest = cv2.min(cv2.min(rgb[:, :, 0], rgb[:, :, 1]), rgb[:, :, 2])
    if float((darkest > 200).mean()) > 0.05:
        return "bright"
    b = max(1, min(h, w) // 20)
    parts = (rgb[:b], rgb[-b:], rgb[:, :b], rgb[:, -b:])
    ring = np.concatenate([_brightness(p).ravel() for p in parts])
    ring_median = float(np.median(ring))
    if ring_median < 60:
        return "dark"
    if ring_median > 150:
        return "bright"
    return "dark" if float(np.median(_brightness(rgb))) < 100 else "bright"


def _brightness(rgb: np.ndarray) -> np.ndarray:
    """max(R, G, B) (HSV value); OpenCV is ~30x faster than numpy's max over the channel axis."""
    rgb = np.ascontiguousarray(rgb)
    return cv2.max(cv2.max(rgb[:, :, 0], rgb[:, :, 1]), rgb[:, :, 2])


def segment_tissue(
    rgb: np.ndarray, *, pixel_um: float, params: TissueParams = TissueParams(), background: str | None = None
) -> tuple[np.ndarray, str, float]:
    """Pure image function: `(mask bool [h, w], background, threshold)` for an RGB thumbnail whose pixels
    are `pixel_um` µm wide."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise InvalidParameterError(f"expected uint8 RGB [h, w, 3], got {rgb.dtype} {rgb.shape}")
    if not pixel_um > 0:
        raise InvalidParameterError(f"pixel size must be positive, got {pixel_um}")
    background = background or detect_background(rgb)
    if background == "dark":
        # Fluorescence: nuclei/markers glow on black. Saturation is meaningless near black (noise), so
        # threshold the brightest channel; a mean filter first turns scattered nuclei into tissue density.
        feature = _brightness(rgb)
        k = _odd(params.median_um / pixel_um)
        feature = cv2.blur(feature, (k, k)) if k > 1 else feature
        floor = params.min_brightness
    elif background == "bright":
        feature = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[:, :, 1]
        k = _odd(params.median_um / pixel_um)
        feature = cv2.medianBlur(feature, k) if k > 1 else feature
        floor = params.min_saturation
    else:
        raise InvalidParameterError(f"background must be 'bright' or 'dark', got {background!r}")
    # Otsu suits the two-peaked saturation histogram of bright-field; fluorescence has one dominant black
    # peak and a long tail of sparse signal, which the triangle method handles better.
    method = cv2.THRESH_TRIANGLE if background == "dark" else cv2.THRESH_OTSU
    otsu, _ = cv2.threshold(feature, 0, 255, cv2.THRESH_BINARY + method)
    threshold = max(float(otsu), float(floor))
    mask = (feature > threshold).astype(np.uint8)

    kc = max(1, round(params.close_um / pixel_um))
    if kc > 1:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (kc, kc))
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)

    px_area = pixel_um * pixel_um
    # On a small crop (a TMA core, a biopsy region) the absolute minimum areas can exceed the tissue itself:
    # cap them at a small share of the image so they only ever remove specks relative to what is there.
    cap = MAX_FILTER_SHARE * mask.size
    mask = _drop_small_components(mask, min(params.min_tissue_um2 / px_area, cap))
    mask = _fill_small_holes(mask, min(params.min_hole_um2 / px_area, cap))
    return mask.astype(bool), background, threshold


def _drop_small_components(mask: np.ndarray, min_px: float) -> np.ndarray:
    _n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_px
    keep[0] = False  # label 0 is the background
    return keep[labels].astype(np.uint8)


def _fill_small_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    """Holes = background components not touching the image border; fill those smaller than `max_px`."""
    inv = (mask == 0).astype(np.uint8)
    _n, labels, stats, _ = cv2.connectedComponentsWithStats(inv, connectivity=4)
    h, w = mask.shape
    x, y = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
    bw, bh = stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT]
    touches = (x == 0) | (y == 0) | (x + bw == w) | (y + bh == h)
    fill = (~touches) & (stats[:, cv2.CC_STAT_AREA] < max_px)
    fill[0] = False  # label 0 = the tissue itself
    out = mask.copy()
    out[fill[labels]] = 1
    return out


def mask_image(reader: SlideReader, mpp: float, params: TissueParams = TissueParams()) -> np.ndarray:
    """RGB image of the whole slide at about `params.mask_mpp` µm/px.

    A pyramid level up to 25 % coarser than asked is taken whole (one read; for tiled JPEG TIFFs straight
    from the stored tiles), and area-shrunk only if it is much finer; this avoids reading a level 2x finer
    than needed because a downsample is 16.003 instead of 16. A JPEG 2000 level much finer than needed is
    decoded at a reduced wavelet resolution instead (`_reduced_j2k`). Levels too large for one read go through
    the reader's chunked thumbnail, so memory stays bounded.
    """
    from service.slides.fasttiles import FastTiffSource, open_tiff_level

    w0, h0 = reader.dimensions
    want = max(1.0, params.mask_mpp / mpp)  # desired downsample from level 0 (never upsample)
    longest = max(w0, h0)
    if longest / want > params.max_thumbnail_side:
        want = longest / params.max_thumbnail_side
    elif longest / want < params.min_thumbnail_side:
        want = max(1.0, longest / params.min_thumbnail_side)
    ds = reader.level_downsamples
    usable = [i for i in range(len(ds)) if ds[i] <= want * 1.25] or [0]
    level = max(usable, key=lambda i: ds[i])
    lw, lh = (int(v) for v in reader.level_dimensions[level])
    if lw * lh > MAX_DIRECT_READ_PIXELS:
        side = max(16, min(longest, round(longest / want)))
        return np.ascontiguousarray(reader.thumbnail(side))
    shrink = ds[level] / want
    tiff_level = open_tiff_level(getattr(reader, "path", ""), lw, lh)
    img = None
    if tiff_level is not None:
        source = FastTiffSource(tiff_level, cache_bytes=0)
        try:
            img = _reduced_j2k(tiff_level, shrink) if shrink < 0.8 else None
            if img is None:
                img = source.read(0, 0, (lw, lh))
        finally:
            source.close()
    else:
        img = reader.read_region((0, 0), level, (lw, lh))
    if shrink < 0.8:  # level much finer than needed: area-average down
        size = (max(1, round(lw * shrink)), max(1, round(lh * shrink)))
        if img.shape[:2] != (size[1], size[0]):
            enlarge = img.shape[0] < size[1] or img.shape[1] < size[0]  # a reduced decode a pixel short
            img = cv2.resize(img, size, interpolation=cv2.INTER_LINEAR if enlarge else cv2.INTER_AREA)
    return np.ascontiguousarray(img)


def _reduced_j2k(level, shrink: float) -> np.ndarray | None:
    """The JPEG 2000 mask level decoded at a reduced wavelet resolution (`fasttiles.reduced_level_image`:
    OpenJPEG skips the finer resolutions, ~15x less CPU on the TCGA sample), or None where that does not apply.
    Its pixels are the wavelet low-pass band instead of an area average (measured: docs/slides.md)."""
    from service.slides.fasttiles import reduced_level_image

    return reduced_level_image(level, shrink)


def tissue_mask(
    reader: SlideReader, *, mpp: float, params: TissueParams = TissueParams(), background: str | None = None
) -> TissueMask:
    """Mask of `reader` at about `params.mask_mpp` µm/px; `mpp` is the level-0 µm/px (validated upstream).

    Raises `NoTissueError` when nothing survives the filters (blank slide, wrong polarity forced).
    """
    if not params.mask_mpp > 0:
        raise InvalidParameterError(f"mask µm/px must be positive, got {params.mask_mpp}")
    w0, h0 = reader.dimensions
    thumb = mask_image(reader, mpp, params)
    th, tw = thumb.shape[:2]
    scale = (tw / w0, th / h0)
    pixel_um = mpp / ((scale[0] + scale[1]) / 2.0)
    mask, bg, threshold = segment_tissue(thumb, pixel_um=pixel_um, params=params, background=background)
    if not mask.any():
        raise NoTissueError(
            f"no tissue found (background {bg}, threshold {threshold:.0f}/255 on a {tw}x{th} thumbnail)",
            slide=getattr(getattr(reader, "path", None), "name", None),
        )
    return TissueMask(mask=mask, thumbnail=thumb, scale=scale, mask_mpp=pixel_um, background=bg, threshold=threshold)
