"""Small helpers every reader shares: argument checks, alpha compositing, white canvases."""

from __future__ import annotations

import math

import cv2
import numpy as np

from service.errors import InvalidParameterError, SlideTooLargeError

# One read_region call may not allocate more than this (≈300 MB of RGB): a bad caller must not OOM a worker.
MAX_REGION_PIXELS = 100_000_000


def check_region(
    location: tuple[int, int], level: int, size: tuple[int, int], level_count: int, slide: str
) -> tuple[int, int, int, int, int]:
    """Validated `(x, y, level, w, h)` as ints, or a typed refusal."""
    try:
        x, y = (int(v) for v in location)
        w, h = (int(v) for v in size)
        level = int(level)
    except (TypeError, ValueError):
        msg = f"bad region {location!r} / {size!r} / level {level!r}"
        raise InvalidParameterError(msg, slide=slide) from None
    if not 0 <= level < level_count:
        raise InvalidParameterError(f"level {level} does not exist (slide has {level_count})", slide=slide)
    if w <= 0 or h <= 0:
        raise InvalidParameterError(f"region size must be positive, got {w}x{h}", slide=slide)
    if w * h > MAX_REGION_PIXELS:
        raise SlideTooLargeError(f"region {w}x{h} exceeds {MAX_REGION_PIXELS} pixels per read", slide=slide)
    return x, y, level, w, h


def white(h: int, w: int) -> np.ndarray:
    return np.full((h, w, 3), 255, dtype=np.uint8)


def to_rgb(arr: np.ndarray) -> np.ndarray:
    """uint8 RGB from grey / grey+alpha / RGB / RGBA; transparent pixels are composited onto white. Wider
    integer samples are scaled by their type's range, as libtiff (OpenSlide) does: scaling by each tile's own
    maximum gave one stored value different 8-bit values in different tiles."""
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.integer) and arr.dtype.itemsize > 1:
            arr = (arr.astype(np.float32) * (255.0 / float(np.iinfo(arr.dtype).max))).round()
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    c = arr.shape[2]
    if c == 4 and arr.size:  # OpenSlide's RGBA: OpenCV splits colour and alpha in one pass each, where NumPy's
        arr = np.ascontiguousarray(arr)  # strided 3-of-4 copy cost as much as OpenSlide's own read
        return _onto_white(cv2.cvtColor(arr, cv2.COLOR_RGBA2RGB), cv2.extractChannel(arr, 3))  # (0.46 vs 0.01 ms)
    if c in (2, 4):  # grey + alpha (or an empty RGBA region)
        rgb = arr[:, :, :-1] if c == 4 else np.repeat(arr[:, :, :1], 3, axis=2)
        return _onto_white(np.ascontiguousarray(rgb), arr[:, :, -1])
    if c == 1:
        return np.ascontiguousarray(np.repeat(arr, 3, axis=2))
    if c == 3:
        return np.ascontiguousarray(arr)
    return np.ascontiguousarray(arr[:, :, :3])


def _onto_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """`rgb` (uint8, writable; changed in place) composited onto white by `alpha`, rounding to nearest. Only the
    box around the pixels that are not opaque is blended (a slide's edge, gaps between camera fields): opaque
    pixels keep their value under the same arithmetic."""
    if int(alpha.min(initial=255)) == 255:
        return rgb
    see = alpha != 255
    rows, cols = np.flatnonzero(see.any(axis=1)), np.flatnonzero(see.any(axis=0))
    box = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
    a = alpha[box][:, :, None].astype(np.uint16)
    rgb[box] = (rgb[box].astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return rgb


def downsamples_from(dims: list[tuple[int, int]]) -> tuple[float, ...]:
    """Per-level downsample as OpenSlide defines it: the mean of the width and height ratios to level 0."""
    w0, h0 = dims[0]
    return tuple((w0 / w + h0 / h) / 2.0 for w, h in dims)


def check_dimensions(dims: list[tuple[int, int]], max_side: int, slide: str) -> None:
    """Decompression-bomb guard on declared sizes, before any pixel is decoded."""
    for i, (w, h) in enumerate(dims):
        if w <= 0 or h <= 0:
            from service.errors import CorruptSlideError

            raise CorruptSlideError(f"level {i} declares an empty size {w}x{h}", slide=slide)
        if max(w, h) > max_side:
            raise SlideTooLargeError(
                f"declared size {w}x{h} px exceeds the limit of {max_side} px per side (raise max_side "
                "if the slide is genuine)",
                slide=slide,
            )


def tile_grid(width: int, height: int, tw: int, th: int) -> tuple[int, int]:
    return math.ceil(width / tw), math.ceil(height / th)


class TileCache:
    """Thread-safe LRU of decoded tiles, bounded in bytes.

    Patches on a grid straddle stored tiles, so neighbouring reads decode the same tile again; keeping the
    last few decoded tiles makes a row-major grid decode each stored tile about once."""

    def __init__(self, max_bytes: int = 64 * 1024 * 1024) -> None:
        import threading
        from collections import OrderedDict

        self.max_bytes = max_bytes
        self._items: OrderedDict[object, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: object) -> np.ndarray | None:
        with self._lock:
            arr = self._items.get(key)
            if arr is not None:
                self._items.move_to_end(key)
            return arr

    def put(self, key: object, arr: np.ndarray) -> None:
        if arr.nbytes > self.max_bytes:
            return
        arr.setflags(write=False)  # shared between callers: never mutated
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._items[key] = arr
            self._bytes += arr.nbytes
            while self._bytes > self.max_bytes and self._items:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= dropped.nbytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0
