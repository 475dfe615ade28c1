"""OpenCV's `INTER_AREA` shrink, bit for bit, at a third to a half of its CPU time for fractional factors.

Every patch read at a finer µm/px than it is delivered goes through an area resize: a Hamamatsu 40x slide at
0.5 µm/px reads 245 px and delivers 224 (factor 35/32), and the released mSTAR/UNI field of view (128 µm in
224 px) reads 256 px on a 0.5 µm/px slide and 512 on a 40x Aperio one. OpenCV has a fast path only for whole
factors (448 -> 224); for a fractional one its generic code costs about as much as decoding the patch, so it
capped the NDPI reader at ~1.4x the OpenSlide loop (docs/slides.md).

Same arithmetic, laid out for SIMD: OpenCV shrinks each source row (a float32 sum of the 2-5 weighted
pixels each output pixel overlaps, in source order), then sums those rows the same way and rounds half to
even. Here the source is transposed first, so the horizontal pass also becomes weighted sums of whole
contiguous rows, which numba vectorises; the weights are read off OpenCV itself (an impulse image through
`cv2.resize`), so the result is identical to `cv2.resize(..., INTER_AREA)` in every pixel (tests compare
random and real patches over many factors). Whole factors and enlargements stay on OpenCV, which is faster or
not an area filter there.

The kernels are compiled by numba on first use and cached on disk (`jit.compile_kernel`).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable

import cv2
import numpy as np

from service.slides.jit import compile_kernel

log = logging.getLogger(__name__)

MAX_SIDE = 4096  # the weight table comes from a side x side float32 impulse image: bounded, else OpenCV


@functools.lru_cache(maxsize=64)
def area_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(index, weight, count) per output pixel of a `src` -> `dst` area shrink along one axis, in OpenCV's tap
    order and with its float32 weights: row j of an identity image shrunk along x holds the weights of source
    pixel j, and rows pass through untouched (factor 1, weight 1.0)."""
    w = cv2.resize(np.eye(src, dtype=np.float32), (dst, src), interpolation=cv2.INTER_AREA)  # [src, dst]
    nz = w != 0
    count = nz.sum(0).astype(np.int32)
    index = np.zeros((dst, int(count.max())), np.int32)
    weight = np.zeros(index.shape, np.float32)
    for d in range(dst):
        rows = np.flatnonzero(nz[:, d])
        index[d, : len(rows)] = rows
        weight[d, : len(rows)] = w[rows, d]
    for arr in (index, weight, count):
        arr.setflags(write=False)
    return index, weight, count


def _weighted_rows_u8(src, index, weight, count, out):  # pragma: no cover - compiled by numba
    """out[d] = sum_k weight[d, k] * src[index[d, k]] in float32, taps in order (OpenCV's buf[])."""
    n = src.shape[1]
    for d in range(out.shape[0]):
        r = index[d, 0]
        w = weight[d, 0]
        for j in range(n):
            out[d, j] = np.float32(src[r, j]) * w
        for k in range(1, count[d]):
            r = index[d, k]
            w = weight[d, k]
            for j in range(n):
                out[d, j] = out[d, j] + np.float32(src[r, j]) * w


def _weighted_rows_round(src, index, weight, count, out):  # pragma: no cover - compiled by numba
    """The vertical pass (OpenCV's sum[]), then round half to even and saturate as cvRound does."""
    n = src.shape[1]
    acc = np.empty(n, np.float32)
    lo = np.float32(0)
    hi = np.float32(255)
    for d in range(out.shape[0]):
        r = index[d, 0]
        w = weight[d, 0]
        for j in range(n):
            acc[j] = w * src[r, j]
        for k in range(1, count[d]):
            r = index[d, k]
            w = weight[d, k]
            for j in range(n):
                acc[j] = acc[j] + w * src[r, j]
        for j in range(n):
            out[d, j] = np.uint8(min(max(np.rint(acc[j]), lo), hi))


@functools.cache
def _kernels() -> tuple[Callable, Callable] | None:
    """The two passes, compiled (or loaded from numba's cache) on first use and checked once against OpenCV on
    a small random image; None where numba cannot compile them here (not installed, an unsupported CPU) or
    their pixels would differ: OpenCV then does every resize, slower and with the same pixels."""
    try:
        kernels = compile_kernel(_weighted_rows_u8), compile_kernel(_weighted_rows_round)
        probe = np.random.default_rng(0).integers(0, 256, (37, 41, 3), np.uint8)
        if not np.array_equal(_resize(kernels, probe, 29, 33), _opencv(probe, 29, 33)):
            raise ArithmeticError("the compiled passes do not give OpenCV's pixels")
        return kernels
    except Exception as exc:  # any numba failure: slower, never a failed slide
        log.warning("area_resize: numba kernels unavailable (%s); using OpenCV's INTER_AREA", exc)
        return None


def _use_opencv(h: int, w: int, dh: int, dw: int) -> bool:
    if dh > h or dw > w or max(h, w) > MAX_SIDE:
        return True  # enlarging is not an area filter; huge sides would make a huge weight table
    return h % dh == 0 and w % dw == 0  # whole factors: OpenCV's own fast path is quicker


def _opencv(region: np.ndarray, width: int, height: int) -> np.ndarray:
    return cv2.resize(region, (width, height), interpolation=cv2.INTER_AREA)


def area_resize(region: np.ndarray, width: int, height: int, out: np.ndarray | None = None) -> np.ndarray:
    """`cv2.resize(region, (width, height), interpolation=cv2.INTER_AREA)` for a uint8 (H, W) or (H, W, C)
    image, with identical pixels; written into `out` when given (the shape and dtype OpenCV returns; a batch's
    slot, which saves copying every patch once more)."""
    h, w = region.shape[:2]
    c = 1 if region.ndim == 2 else region.shape[-1]
    fast = region.dtype == np.uint8 and region.ndim in (2, 3) and c <= 4 and not _use_opencv(h, w, height, width)
    kernels = _kernels() if fast else None
    slot = out is not None and out.dtype == np.uint8 and out.flags.c_contiguous
    if kernels is not None and slot and out.shape == _out_shape(height, width, c):
        return _resize(kernels, region, width, height, out)  # straight into the slot
    result = _opencv(region, width, height) if kernels is None else _resize(kernels, region, width, height)
    if out is None:
        return result
    if out.shape != result.shape or out.dtype != result.dtype:
        raise ValueError(f"out is {out.dtype}{out.shape}, the resize gives {result.dtype}{result.shape}")
    out[...] = result
    return out


def _out_shape(height: int, width: int, c: int) -> tuple[int, ...]:
    return (height, width, c) if c > 1 else (height, width)  # as cv2: (H, W, 1) -> (H, W)


def _resize(
    kernels: tuple[Callable, Callable], region: np.ndarray, width: int, height: int, out: np.ndarray | None = None
) -> np.ndarray:
    horizontal, vertical = kernels
    h, w = region.shape[:2]
    c = 1 if region.ndim == 2 else region.shape[-1]
    xi, xw, xn = area_taps(w, width)
    yi, yw, yn = area_taps(h, height)
    scratch = _scratch(h, w, c, width)
    cols = cv2.transpose(region, dst=scratch.cols)  # source columns as rows
    horizontal(cols.reshape(w, h * c), xi, xw, xn, scratch.shrunk.reshape(width, h * c))
    rows = cv2.transpose(scratch.shrunk, dst=scratch.rows)  # horizontal pass, back to source row order
    if out is None:
        out = np.empty(_out_shape(height, width, c), np.uint8)
    vertical(rows.reshape(h, width * c), yi, yw, yn, out.reshape(height, width * c))
    return out


class _Scratch:
    """One thread's intermediate arrays for one shape (0.2-1 MB): fresh ones every patch paid their page
    faults on every call, as much again as the two passes."""

    def __init__(self, h: int, w: int, c: int, width: int) -> None:
        self.cols = np.empty((w, h, c) if c > 1 else (w, h), np.uint8)
        self.shrunk = np.empty((width, h, c) if c > 1 else (width, h), np.float32)
        self.rows = np.empty((h, width, c) if c > 1 else (h, width), np.float32)


_local = threading.local()


def _scratch(h: int, w: int, c: int, width: int) -> _Scratch:
    key = (h, w, c, width)
    if getattr(_local, "key", None) != key:  # a reader thread resizes one shape over and over
        _local.key, _local.scratch = key, _Scratch(h, w, c, width)
    return _local.scratch
