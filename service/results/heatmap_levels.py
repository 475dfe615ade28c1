"""Heatmaps re-rendered from saved per-patch scores at any pyramid level, without running a model.

The image is exactly the size of the requested pyramid level, so it lies on the slide pixel for pixel (a
viewer stretches it over the whole slide; `--slide` blends it over that level). Patches that were not analysed
stay transparent, so "low score" and "not analysed" never look alike. Scores are min-max normalised per slide,
as in `heatmap.png`.

Levels up to `MAX_PIXELS` are one array (a PNG); larger ones, up to level 0 of a 40x slide, are rendered tile
by tile into a tiled, pyramidal BigTIFF (`write_tiled_tiff`) that never holds more than a few tiles, with
pixels identical to the array path's (both render windows of the same map, `render_window`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.atomic import atomic_path
from service.errors import InvalidParameterError
from service.results.patch_scores import PatchScores

MAX_PIXELS = 64_000_000  # 256 MB of RGBA (about 700 MB while rendering): ask for a coarser level beyond this
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


def level_size(level_dimensions: list, level: int, max_pixels: int | None = MAX_PIXELS) -> tuple[int, int]:
    if not isinstance(level, int) or not 0 <= level < len(level_dimensions):
        raise InvalidParameterError(f"level must be 0-{len(level_dimensions) - 1} for this slide, got {level}")
    w, h = (int(v) for v in level_dimensions[level])
    if max_pixels is not None and w * h > max_pixels:
        raise InvalidParameterError(
            f"level {level} is {w}x{h} px, over the {max_pixels // 1_000_000} MP limit of one image; ask for a "
            "coarser level, or write it as a tiled TIFF (`mstar heatmap --level N --format tiff`)"
        )
    return w, h


def _normalised(values: np.ndarray) -> np.ndarray:
    v = np.asarray(values, np.float64).reshape(-1)
    lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 1.0)
    return (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)


def _patch_rects(scores: PatchScores, level0: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """int64 [N, 4] (x0, y0, x1, y1) of each patch on a `size` (w, h) canvas covering level 0: at least one
    pixel each, so a patch never vanishes at a coarse level."""
    sx, sy = size[0] / level0[0], size[1] / level0[1]
    s = scores.patch_size_level0
    xy = np.asarray(scores.coords, np.float64).reshape(-1, 2)
    x0, y0 = (xy[:, 0] * sx).astype(np.int64), (xy[:, 1] * sy).astype(np.int64)
    x1 = np.maximum(x0 + 1, np.round((xy[:, 0] + s) * sx).astype(np.int64))
    y1 = np.maximum(y0 + 1, np.round((xy[:, 1] + s) * sy).astype(np.int64))
    return np.stack([x0, y0, x1, y1], axis=1)


def _window_map(
    rects: np.ndarray, norm: np.ndarray, window: tuple[int, int, int, int], which: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(mean normalised score per pixel, coverage) of the canvas window (x, y, w, h); `which` limits the
    patches looked at to those that may touch it."""
    wx, wy, ww, wh = window
    acc = np.zeros((wh, ww), np.float32)
    cnt = np.zeros((wh, ww), np.uint16)
    idx = range(len(rects)) if which is None else which.tolist()
    for i in idx:
        x0, y0, x1, y1 = rects[i].tolist()
        x0, y0, x1, y1 = max(x0 - wx, 0), max(y0 - wy, 0), min(x1 - wx, ww), min(y1 - wy, wh)
        if x0 < x1 and y0 < y1:
            acc[y0:y1, x0:x1] += norm[i]
            cnt[y0:y1, x0:x1] += 1
    covered = cnt > 0
    acc[covered] /= cnt[covered]
    return acc, covered


def normalised_map(
    scores: PatchScores, values: np.ndarray, level0: tuple[int, int], size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """(min-max normalised mean score per pixel, coverage) on a `size` (w, h) canvas covering level 0."""
    rects = _patch_rects(scores, level0, size)
    return _window_map(rects, _normalised(values), (0, 0, size[0], size[1]))


def _colour(
    values: np.ndarray, covered: np.ndarray, cmap: str, alpha: float, background: np.ndarray | None
) -> np.ndarray:
    """uint8 [h, w, 4]: coloured where analysed, transparent elsewhere; over `background` (RGB), opaque.

    The colour map's 256-entry table is indexed as matplotlib indexes it, and the blend runs in bands of rows:
    the same pixels as colouring the whole float image at once, at about 11 bytes a pixel in all instead of 60
    (a 64 MP level took 3.8 GB in the gateway)."""
    from matplotlib import colormaps

    h, w = values.shape
    cm = colormaps[cmap]
    table = (cm(np.arange(cm.N))[:, :3] * 255.0).astype(np.float32)
    out = np.empty((h, w, 4), np.uint8)
    band = max(1, (1 << 20) // max(w, 1))  # about a megapixel of float temporaries at a time
    for y in range(0, h, band):
        x = np.array(values[y : y + band])  # in the map's own dtype, as matplotlib's Colormap.__call__ scales it
        x *= cm.N
        idx = np.clip(x.astype(np.int64), 0, cm.N - 1)
        rgba = table[idx]
        a = np.where(covered[y : y + band], alpha, 0.0).astype(np.float32)[..., None]
        if background is None:
            out[y : y + band, :, :3] = rgba.round().astype(np.uint8)
            out[y : y + band, :, 3:] = (a * 255.0).round().astype(np.uint8)
        else:
            bg = np.asarray(background[y : min(y + band, h), :w, :3], np.float32)
            out[y : y + band, :, :3] = (bg * (1.0 - a) + rgba * a).round().astype(np.uint8)
            out[y : y + band, :, 3] = 255
    return out


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise InvalidParameterError(f"alpha must be in [0, 1], got {alpha}")


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
    _check_alpha(alpha)
    w, h = level_size(level_dimensions, level)
    level0 = (int(level_dimensions[0][0]), int(level_dimensions[0][1]))
    values, covered = normalised_map(scores, pick_scores(scores, score), level0, (w, h))
    return _colour(values, covered, cmap, alpha, background)


def write_tiled_tiff(
    path: str | Path,
    scores: PatchScores,
    level_dimensions: list,
    level: int,
    *,
    score: str = "attention",
    cmap: str = "inferno",
    alpha: float = DEFAULT_ALPHA,
    background=None,
    tile: int = 512,
    min_side: int = 1024,
) -> tuple[int, int]:
    """`level` of any size as a tiled (deflate), pyramidal BigTIFF: RGBA at full size, then halved in SubIFDs
    until the longer side is under `min_side`. Rendered one tile at a time (each reduced resolution from the
    patches again, not from the image above), so memory stays a few tiles whatever the level's size.

    `background(x, y, w, h) -> RGB` reads that window of the level to blend over; then only the full
    resolution is written (a reduced one would need the slide read again at each size). Tiles no patch touches
    cost nothing to render. Returns the (w, h) written."""
    import tifffile

    _check_alpha(alpha)
    w, h = level_size(level_dimensions, level, max_pixels=None)
    level0 = (int(level_dimensions[0][0]), int(level_dimensions[0][1]))
    norm = _normalised(pick_scores(scores, score))
    sizes = [(w, h)]
    while background is None and max(sizes[-1]) >= min_side and min(sizes[-1]) >= 2 * tile:
        sizes.append((max(1, sizes[-1][0] // 2), max(1, sizes[-1][1] // 2)))

    def tiles(size: tuple[int, int]):
        cw, ch = size
        rects = _patch_rects(scores, level0, size)
        # which patches may touch each tile: a patch lands in every tile its rectangle overlaps
        buckets: dict[tuple[int, int], list[int]] = {}
        for i, (x0, y0, x1, y1) in enumerate(rects.tolist()):
            for ty in range(y0 // tile, (min(y1, ch) - 1) // tile + 1):
                for tx in range(x0 // tile, (min(x1, cw) - 1) // tile + 1):
                    buckets.setdefault((tx, ty), []).append(i)
        for ty in range(-(-ch // tile)):
            for tx in range(-(-cw // tile)):
                win = (tx * tile, ty * tile, min(tile, cw - tx * tile), min(tile, ch - ty * tile))
                which = np.asarray(buckets.get((tx, ty), []), np.int64)
                if not len(which) and background is None:
                    yield empty
                    continue
                values, covered = _window_map(rects, norm, win, which)
                bg = background(*win) if background is not None else None
                out = np.zeros((tile, tile, 4), np.uint8)  # edge tiles are padded, as TIFF tiles must be
                out[: win[3], : win[2]] = _colour(values, covered, cmap, alpha, bg)
                yield out

    # an untouched tile, as the array path draws it: the colour map's zero, transparent
    empty = _colour(np.zeros((tile, tile), np.float32), np.zeros((tile, tile), bool), cmap, alpha, None)
    path = Path(path)
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        opts = dict(tile=(tile, tile), photometric="rgb", extrasamples=["unassalpha"], compression="zlib")
        opts["compressionargs"] = {"level": 1}  # empty tiles dominate a slide: speed over a few % of size
        opts["metadata"] = None
        tif.write(tiles(sizes[0]), shape=(h, w, 4), dtype=np.uint8, subifds=len(sizes) - 1, **opts)
        for size in sizes[1:]:
            tif.write(tiles(size), shape=(size[1], size[0], 4), dtype=np.uint8, subfiletype=1, **opts)
    return w, h


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
