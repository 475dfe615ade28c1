"""The ctypes OpenJPEG binding (`service.slides.openjpeg`): the stored components, exactly as Pillow's OpenJPEG
returns them, at full and reduced resolution; damaged, oversized and truncated codestreams are ValueErrors; and
the decode leaves the GIL free, which is why it exists."""

from __future__ import annotations

import io
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import openslide
import pytest
from PIL import Image

from service.slides import fasttiles, openjpeg

pytestmark = pytest.mark.skipif(not openjpeg.available(), reason="no libopenjp2 loads (Pillow's wheel bundles one)")


def _cmu_rgb(cmu_svs: Path, size: int) -> np.ndarray:
    with openslide.OpenSlide(str(cmu_svs)) as s:
        return np.asarray(s.read_region((600, 600), 0, (size, size)).convert("RGB"))


def _j2k(rgb: np.ndarray, **options) -> bytes:
    """A raw J2K codestream of real pixels, coded by Pillow's OpenJPEG (5 resolution levels by default)."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG2000", no_jp2=True, irreversible=True, **options)
    return buf.getvalue()


def _pillow(codestream: bytes, reduce: int = 0) -> np.ndarray:
    with Image.open(io.BytesIO(codestream)) as im:
        im.reduce = reduce
        im.load()
        return np.asarray(im)


@pytest.mark.parametrize("mct", [0, 1])
def test_components_equal_pillows_decode(cmu_svs: Path, mct: int) -> None:
    """With and without the codestream's colour transform (which OpenJPEG inverts itself), at full and reduced
    resolution: the planes are Pillow's pixels, byte for byte, from the same library."""
    rgb = _cmu_rgb(cmu_svs, 256)
    stream = _j2k(rgb, mct=mct)
    for reduce in (0, 1, 3):
        planes = openjpeg.decode_components(stream, reduce, expect_size=(256, 256))
        assert len(planes) == 3 and all(p.dtype == np.uint8 for p in planes)
        assert np.array_equal(np.stack(planes, axis=-1), _pillow(stream, reduce)), reduce
    assert np.abs(np.stack(openjpeg.decode_components(stream), -1).astype(int) - rgb).mean() < 3  # lossy, close


@pytest.mark.skipif(shutil.which("opj_compress") is None, reason="opj_compress (tests/sysdeps.sh) codes 4:2:2 tiles")
def test_subsampled_chroma_stays_at_its_stored_width(cmu_svs: Path, tmp_path: Path) -> None:
    """An Aperio 33003 tile: chroma planes come back half width, and repeated to full width they are what
    Pillow returns for the same codestream in an sRGB container (the fallback path), so both give one RGB."""
    from slide_fixtures import _ycbcr422_j2k

    stream = _ycbcr422_j2k(_cmu_rgb(cmu_svs, 256), tmp_path)
    y, cb, cr = openjpeg.decode_components(stream, expect_size=(256, 256))
    assert y.shape == (256, 256) and cb.shape == cr.shape == (256, 128)
    with Image.open(io.BytesIO(fasttiles._srgb_jp2(stream, 256, 256))) as im:
        im.load()
        ycc = np.asarray(im)
    assert np.array_equal(ycc[..., 0], y)
    assert np.array_equal(ycc[..., 1], np.repeat(cb, 2, axis=1))
    assert np.array_equal(ycc[..., 2], np.repeat(cr, 2, axis=1))


def test_bad_codestreams_are_value_errors(cmu_svs: Path) -> None:
    stream = _j2k(_cmu_rgb(cmu_svs, 256))
    with pytest.raises(ValueError):
        openjpeg.decode_components(b"not a codestream at all")
    with pytest.raises(ValueError):
        openjpeg.decode_components(stream[: len(stream) // 3] + b"\x00" * 64)  # cut short, tail garbage
    with pytest.raises(ValueError):
        openjpeg.decode_components(stream, reduce=6)  # only 5 resolution levels to drop
    with pytest.raises(ValueError, match="header says 256x256 px, not 512x512"):
        openjpeg.decode_components(stream, expect_size=(512, 512))


def test_oversized_header_is_refused_before_decoding(cmu_svs: Path) -> None:
    """A tile header claiming 60,000 x 60,000 px (14 GB of planes) is refused from the header alone."""
    stream = bytearray(_j2k(_cmu_rgb(cmu_svs, 256)))
    siz = stream.index(b"\xff\x51")  # SIZ: marker, Lsiz, Rsiz, Xsiz, Ysiz, ...
    stream[siz + 6 : siz + 14] = (60_000).to_bytes(4, "big") * 2
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="60000x60000"):
        openjpeg.decode_components(bytes(stream), expect_size=(256, 256))
    assert time.perf_counter() - t0 < 5  # nothing was decoded (a full decode would allocate gigabytes)


def test_decoding_leaves_the_gil_free(cmu_svs: Path) -> None:
    """A Python thread keeps running while a large codestream decodes: the point of decoding through ctypes
    (Pillow's decoder holds the GIL for the whole decode, so the reader threads ran on one core)."""
    stream = _j2k(np.tile(_cmu_rgb(cmu_svs, 512), (2, 2, 1)))  # 1,024 px
    ticks = [0]
    stop = threading.Event()

    def count() -> None:
        while not stop.is_set():
            ticks[0] += 1

    def rate_while(fn) -> float:
        ticks[0] = 0
        stop.clear()
        worker = threading.Thread(target=count)
        t0 = time.perf_counter()
        worker.start()
        fn()
        stop.set()
        worker.join()
        return ticks[0] / (time.perf_counter() - t0)

    alone = rate_while(lambda: time.sleep(0.3))  # the counter with the main thread idle
    decoding = rate_while(lambda: [openjpeg.decode_components(stream) for _ in range(4)])
    assert decoding > 0.25 * alone, (decoding, alone)  # with Pillow's decoder: about 0.03


def test_concurrent_decodes_with_damaged_ones_among_them(cmu_svs: Path) -> None:
    """Four threads decoding good and damaged codestreams at once: each good one gives its own pixels, each
    damaged one its own ValueError (the callbacks find their stream by the id OpenJPEG hands back)."""
    from concurrent.futures import ThreadPoolExecutor

    rgb = _cmu_rgb(cmu_svs, 512)
    good = [_j2k(np.ascontiguousarray(rgb[y : y + 128, x : x + 128])) for y in (0, 256) for x in (0, 128, 256, 384)]
    expected = [_pillow(s) for s in good]
    jobs = [(i % len(good), i % 3 == 2) for i in range(48)]

    def decode(job: tuple[int, bool]) -> np.ndarray | str:
        i, damaged = job
        stream = good[i][:200] if damaged else good[i]
        try:
            return np.stack(openjpeg.decode_components(stream, expect_size=(128, 128)), axis=-1)
        except ValueError as exc:
            return str(exc)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(decode, jobs))
    for (i, damaged), got in zip(jobs, results, strict=True):
        if damaged:
            assert isinstance(got, str) and got
        else:
            assert isinstance(got, np.ndarray) and np.array_equal(got, expected[i])
    assert not openjpeg._streams  # nothing left registered
