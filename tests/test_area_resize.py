"""`area_resize` gives OpenCV's INTER_AREA pixels exactly, for every shape the readers hand it."""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np
import openslide
import pytest

from service.slides import area_resize as ar
from service.slides.area_resize import area_resize, area_taps
from service.slides.stream import resize_patch


def _cv2(a: np.ndarray, w: int, h: int) -> np.ndarray:
    return cv2.resize(a, (w, h), interpolation=cv2.INTER_AREA)


@pytest.mark.parametrize(
    ("h", "w", "dh", "dw"),
    [
        (245, 245, 224, 224),  # Hamamatsu 40x read for 0.5 µm/px (35/32)
        (336, 336, 224, 224),  # factor 1.5
        (225, 225, 224, 224),  # 0.502 µm/px Aperio 20x: a sliver of a pixel
        (447, 447, 224, 224),  # just under a whole factor: 3 taps an output pixel
        (700, 700, 224, 224),  # factor 3.125: 4-5 taps
        (300, 257, 200, 224),  # rectangular, different factor per axis
        (96, 960, 33, 101),
    ],
)
@pytest.mark.parametrize("channels", [None, 1, 3, 4])
def test_identical_to_opencv_on_random_pixels(h: int, w: int, dh: int, dw: int, channels: int | None) -> None:
    rng = np.random.default_rng(h * w + dh)
    a = rng.integers(0, 256, (h, w) if channels is None else (h, w, channels), np.uint8)
    ref = _cv2(a, dw, dh)
    out = area_resize(a, dw, dh)
    assert out.shape == ref.shape and out.dtype == np.uint8
    assert np.array_equal(out, ref), int(np.abs(out.astype(int) - ref).max())


def test_identical_to_opencv_on_real_patches_and_extremes(cmu_svs: Path) -> None:
    """Real tissue at every read size from 225 to 460 px (many factors, ties at .5 after the passes), plain
    black/white and one-pixel impulses, which find a wrong tap order or a missing rounding mode fastest."""
    with openslide.OpenSlide(str(cmu_svs)) as s:
        big = np.asarray(s.read_region((300, 200), 0, (460, 460)).convert("RGB"))
    for read in range(225, 461, 7):
        patch = np.ascontiguousarray(big[:read, :read])
        assert np.array_equal(area_resize(patch, 224, 224), _cv2(patch, 224, 224)), read
    for value in (0, 255):
        flat = np.full((245, 245, 3), value, np.uint8)
        assert np.array_equal(area_resize(flat, 224, 224), flat[:224, :224])
    for y, x in [(0, 0), (100, 37), (244, 244), (31, 32)]:
        imp = np.zeros((245, 245, 3), np.uint8)
        imp[y, x] = 255
        assert np.array_equal(area_resize(imp, 224, 224), _cv2(imp, 224, 224)), (y, x)


def test_views_and_fallbacks() -> None:
    rng = np.random.default_rng(3)
    wide = rng.integers(0, 256, (245, 1000, 3), np.uint8)
    view = wide[:, 300:545]  # a run read by the generic path is cut into patches by slicing
    assert not view.flags.c_contiguous
    assert np.array_equal(area_resize(view, 224, 224), _cv2(view, 224, 224))
    whole = rng.integers(0, 256, (448, 448, 3), np.uint8)  # whole factor and enlargement: OpenCV itself
    assert np.array_equal(area_resize(whole, 224, 224), _cv2(whole, 224, 224))
    assert np.array_equal(area_resize(whole[:200, :200], 224, 224), _cv2(whole[:200, :200], 224, 224))
    f = rng.random((245, 245, 3), np.float32)  # other dtypes too
    assert np.array_equal(area_resize(f, 224, 224), _cv2(f, 224, 224))
    small = rng.integers(0, 256, (100, 100, 3), np.uint8)
    assert resize_patch(small, 224).shape == (224, 224, 3)  # enlarging is linear, not area
    assert resize_patch(small, 100) is small


def test_writes_into_a_given_slot() -> None:
    """Into a batch's slot (no copy), a non-contiguous view, or after OpenCV's own path: OpenCV's pixels in `out`;
    a slot of the wrong shape or type is an error, not a silently unfilled patch."""
    rng = np.random.default_rng(13)
    batch = np.zeros((3, 224, 224, 3), np.uint8)
    a = rng.integers(0, 256, (245, 245, 3), np.uint8)
    slot = batch[1]
    assert area_resize(a, 224, 224, out=slot) is slot
    assert np.array_equal(batch[1], _cv2(a, 224, 224)) and not batch[[0, 2]].any()
    wide = np.zeros((224, 448, 3), np.uint8)
    area_resize(a, 224, 224, out=wide[:, ::2])
    assert np.array_equal(wide[:, ::2], _cv2(a, 224, 224))
    whole = rng.integers(0, 256, (448, 448, 3), np.uint8)  # whole factor: OpenCV, then copied into the slot
    assert np.array_equal(area_resize(whole, 224, 224, out=batch[2]), _cv2(whole, 224, 224))
    assert np.array_equal(batch[2], _cv2(whole, 224, 224))
    for bad in (np.zeros((224, 224), np.uint8), np.zeros((224, 224, 3), np.float32), np.zeros((200, 224, 3), np.uint8)):
        with pytest.raises(ValueError, match="out is"):
            area_resize(a, 224, 224, out=bad)
    slot = np.zeros((224, 224, 3), np.uint8)
    assert resize_patch(a[:224, :224], 224, out=slot) is slot and np.array_equal(slot, a[:224, :224])
    small = a[:100, :100]
    assert np.array_equal(resize_patch(small, 224, out=slot), cv2.resize(small, (224, 224)))


def test_taps_are_opencvs_weights() -> None:
    index, weight, count = area_taps(245, 224)
    assert index.shape[0] == 224 and count.min() >= 1 and count.max() <= 3
    assert np.allclose(weight.sum(1), 1, atol=1e-6)  # each output pixel is an average
    assert np.all(np.diff(index[:, 0]) >= 0)  # taps move monotonically along the axis
    assert not weight.flags.writeable  # cached and shared between threads


def test_threads_with_different_shapes_do_not_share_scratch() -> None:
    """Each reader thread keeps its own intermediate arrays: two threads resizing different shapes at once
    must both get OpenCV's pixels."""
    rng = np.random.default_rng(5)
    jobs = {245: rng.integers(0, 256, (245, 245, 3), np.uint8), 336: rng.integers(0, 256, (336, 336, 3), np.uint8)}
    errors: list[str] = []

    def run(a: np.ndarray) -> None:
        ref = _cv2(a, 224, 224)
        for _ in range(200):
            if not np.array_equal(area_resize(a, 224, 224), ref):
                errors.append(str(a.shape))
                return

    threads = [threading.Thread(target=run, args=(a,)) for a in (*jobs.values(), *jobs.values())]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert ar._use_opencv(245, 245, 224, 224) is False


def test_compiles_without_a_writable_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """A container whose tree and home are read-only: numba refuses `cache=True`; the kernels compile
    uncached instead of failing every slide read."""
    import numba

    real = numba.njit

    def no_cache_location(*args, **kw):
        if kw.get("cache"):
            raise RuntimeError("cannot cache function: no locator available for file")
        return real(*args, **kw)

    monkeypatch.setattr(numba, "njit", no_cache_location)
    ar._kernels.cache_clear()
    try:
        a = np.random.default_rng(9).integers(0, 256, (245, 245, 3), np.uint8)
        assert np.array_equal(area_resize(a, 224, 224), _cv2(a, 224, 224))
    finally:
        ar._kernels.cache_clear()


def test_falls_back_to_opencv_where_numba_cannot_compile(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """numba missing or unable to compile on this CPU: slower, the same pixels, a warning; never a failed read."""

    def broken(fn):
        raise ImportError("No module named 'numba'")

    monkeypatch.setattr(ar, "compile_kernel", broken)
    ar._kernels.cache_clear()
    try:
        a = np.random.default_rng(11).integers(0, 256, (245, 245, 3), np.uint8)
        with caplog.at_level("WARNING", logger="service.slides.area_resize"):
            assert np.array_equal(area_resize(a, 224, 224), _cv2(a, 224, 224))
        assert "numba kernels unavailable" in caplog.text
    finally:
        ar._kernels.cache_clear()


def test_falls_back_where_the_compiled_pixels_would_differ(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels are checked once against OpenCV before first use: a numba build that rounded differently
    (say, contracting to fused multiply-adds) would be refused, not silently change every patch."""
    real = ar._weighted_rows_round

    def off_by_one(src, index, weight, count, out):
        real(src, index, weight, count, out)
        out[0, 0] ^= 1

    monkeypatch.setattr(ar, "compile_kernel", lambda fn: off_by_one if fn is real else fn)
    ar._kernels.cache_clear()
    try:
        assert ar._kernels() is None
        a = np.random.default_rng(12).integers(0, 256, (245, 245, 3), np.uint8)
        assert np.array_equal(area_resize(a, 224, 224), _cv2(a, 224, 224))
    finally:
        ar._kernels.cache_clear()
