"""Tile streaming: grid order, shapes, bounded in-flight work, and the fast tile path's exact pixels."""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import openslide
import pytest
from slide_fixtures import write_generic_tiff, write_ome_tiff, write_sparse_dicom, write_transcoded_dicom

from service.errors import InvalidParameterError
from service.slides.grid import build_grid
from service.slides.open import open_slide
from service.slides.stream import PatchReader, iter_batches


@pytest.fixture(scope="module")
def derived(cmu_svs: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("derived-stream")
    return {
        "generic": write_generic_tiff(cmu_svs, d / "cmu.generic.tif"),
        "ome": write_ome_tiff(cmu_svs, d / "cmu.pyramid.ome.tif"),
    }


def _collect(reader, grid, **kw) -> tuple[np.ndarray, np.ndarray]:
    pats, coords = [], []
    for b, c in iter_batches(reader, grid, **kw):
        assert b.dtype == np.uint8 and b.ndim == 4 and b.shape[1:] == (grid.patch_size, grid.patch_size, 3)
        assert c.dtype == np.int64 and len(c) == len(b)
        pats.append(b)
        coords.append(c)
    return np.concatenate(pats), np.concatenate(coords)


def _openslide_patches(path: Path, grid) -> np.ndarray:
    with openslide.OpenSlide(str(path)) as s:
        return np.stack(
            [
                np.asarray(s.read_region((int(x), int(y)), grid.read_level, (grid.read_size,) * 2).convert("RGB"))
                for x, y in grid.coords
            ]
        )


def test_svs_fast_path_equals_openslide_exactly(cmu_svs: Path) -> None:
    with open_slide(cmu_svs) as r:
        g = build_grid(r)
        assert PatchReader(r, g).mode == "fast-tiff"
        fast, coords = _collect(r, g, batch_size=7, workers=2)
        generic, _ = _collect(r, g, batch_size=16, workers=2, fast=False)
    np.testing.assert_array_equal(coords, g.coords)  # grid order, every patch once
    ref = _openslide_patches(cmu_svs, g)
    assert np.array_equal(fast, ref), f"max |diff| {np.abs(fast.astype(int) - ref).max()}"
    assert np.array_equal(generic, ref)


@pytest.mark.parametrize(
    ("container", "target", "level", "fast", "mode", "max_diff"),
    [
        ("generic", 0.5, 0, "auto", "fast-tiff", 0),
        # Level 1 has downsample 2.0003 (odd sizes halved): OpenSlide resamples the fractional position;
        # "exact" keeps OpenSlide's own pixels, "auto" reads from the nearest level pixel (a measured shift of
        # at most half a level pixel) ...
        ("generic", 1.0, 1, "exact", "read_region", 0),
        ("generic", 1.0, 1, "auto", "fast-tiff", None),
        ("ome", 0.5, 0, "auto", "fast-tiff", 0),
        # ... as the tifffile reader (OME SubIFDs) does itself.
        ("ome", 1.0, 1, "auto", "fast-tiff", 0),
    ],
)
def test_derived_tiffs_fast_path_matches_reader(
    container: str, target: float, level: int, fast: str, mode: str, max_diff: int | None, derived: dict[str, Path]
) -> None:
    with open_slide(derived[container]) as r:
        g = build_grid(r, target_mpp=target)
        assert g.read_level == level
        assert PatchReader(r, g, fast=fast).mode == mode
        ours, _ = _collect(r, g, batch_size=16, fast=fast)
        generic, _ = _collect(r, g, batch_size=16, fast=False)
    diff = np.abs(ours.astype(int) - generic)
    if max_diff is not None:  # same libjpeg-turbo decode of the same stored tiles: identical pixels
        assert diff.max() == max_diff, (container, target, diff.max(), diff.mean())
    else:  # nearest level pixel vs OpenSlide's sub-pixel resampling: a small mean difference, same content
        assert 0 < diff.mean() < 6, diff.mean()


def test_ndpi_generic_path_with_resize(ndpi: Path) -> None:
    with open_slide(ndpi) as r:
        g = build_grid(r)
        assert PatchReader(r, g, fast=False).mode == "read_region"
        pats, coords = _collect(r, g, batch_size=10, workers=2, run_length=4, fast=False)
        one, _ = _collect(r, g, batch_size=10, workers=1, run_length=1, fast=False)
        np.testing.assert_array_equal(coords, g.coords)
        assert np.array_equal(pats, one)  # runs of patches read in one call give the same pixels
        x, y = (int(v) for v in g.coords[3])
        region = r.read_region((x, y), g.read_level, (g.read_size, g.read_size))
        np.testing.assert_array_equal(pats[3], cv2.resize(region, (g.patch_size,) * 2, interpolation=cv2.INTER_AREA))
        assert (pats.reshape(len(pats), -1, 3).max(axis=2) > 30).mean(axis=1).min() > 0.02


def test_bounded_inflight_with_slow_consumer_and_early_close(cmu_svs: Path) -> None:
    """A slow consumer never has more than `max_inflight` batches started but not yet taken."""
    import time

    with open_slide(cmu_svs) as r:
        g = build_grid(r, tissue_threshold=0.0)
        started = 0
        lock = threading.Lock()
        original = PatchReader.read_batch

        def counting(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
            nonlocal started
            with lock:
                started += 1
            return original(self, start, stop, out)

        PatchReader.read_batch = counting  # count the real reads; nothing is replaced
        try:
            ahead, total = [], 0
            for consumed, (b, _) in enumerate(iter_batches(r, g, batch_size=4, workers=3, max_inflight=3), 1):
                time.sleep(0.01)  # slow consumer: unbounded readers would race through the whole slide
                with lock:
                    ahead.append(started - consumed)
                total += len(b)
            assert total == len(g) and len(ahead) > 10
            assert max(ahead) <= 3, max(ahead)
            started = 0
            it = iter_batches(r, g, batch_size=4, workers=2, max_inflight=2)
            first, _ = next(it)
            it.close()  # early stop: pending work cancelled, pool shut down, no hang
            time.sleep(0.05)
            assert started <= 3 and first.shape == (4, 224, 224, 3)
        finally:
            PatchReader.read_batch = original


def test_bad_stream_parameters(cmu_svs: Path, shared_data: Path) -> None:
    with open_slide(cmu_svs) as r:
        g = build_grid(r)
        with pytest.raises(InvalidParameterError):
            list(iter_batches(r, g, batch_size=0))
    with open_slide(shared_data / "tiles" / "TCGA-HE-7130-01Z-00-DX1.png", mpp_override=0.5) as r:  # no tiles
        g = build_grid(r)
        with pytest.raises(InvalidParameterError, match="fast tile path"):
            PatchReader(r, g, fast=True)
        with pytest.raises(InvalidParameterError, match="'exact'"):
            PatchReader(r, g, fast="sometimes")


def test_tile_cache_decodes_each_tile_once_and_stays_bounded(cmu_svs: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from service.slides.fasttiles import TileCache, open_tiff_level

    level = open_tiff_level(cmu_svs, 2220, 2967)
    assert level is not None and (level.tile_w, level.tile_h) == (240, 240)
    calls: list[tuple[int, int]] = []

    def load(key: tuple[int, int]) -> np.ndarray:
        calls.append(key)
        return level.decode_tile(key)

    tile_bytes = 240 * 240 * 3
    cache = TileCache(max_bytes=3 * tile_bytes)
    keys = [(x, y) for y in range(2) for x in range(4)] * 4
    with ThreadPoolExecutor(4) as pool:
        tiles = list(pool.map(lambda k: cache.get(k, load), keys[:8]))  # 8 distinct tiles, concurrently
    assert sorted(calls) == sorted(set(keys))
    assert cache._bytes <= 3 * tile_bytes and len(cache._data) == 3
    with openslide.OpenSlide(str(cmu_svs)) as s:
        ref = np.asarray(s.read_region((3 * 240, 240), 0, (240, 240)).convert("RGB"))
    np.testing.assert_array_equal(tiles[7], ref)  # key (3, 1)
    # which 3 tiles survive depends on the order the 4 threads finished; ask the cache, then check both ways
    cached = next(k for k in sorted(set(keys)) if k in cache._data)
    evicted = next(k for k in sorted(set(keys)) if k not in cache._data)
    calls.clear()
    cache.get(cached, load)  # still cached: no decode
    cache.get(evicted, load)  # evicted: decoded again
    assert calls == [evicted]
    level.close()
    assert open_tiff_level(Path("/nonexistent.svs"), 1, 1) is None


def test_tile_cache_ensure_decodes_what_is_missing_and_never_waits(cmu_svs: Path) -> None:
    """`ensure` decodes a tile that is neither cached nor being decoded, leaves cached ones alone, and returns at
    once for a tile another thread is decoding (which `get` would wait for)."""
    import threading

    from service.slides.fasttiles import TileCache, open_tiff_level

    level = open_tiff_level(cmu_svs, 2220, 2967)
    started, release = threading.Event(), threading.Event()
    calls: list[tuple[int, int]] = []

    def load(key: tuple[int, int]) -> np.ndarray:
        calls.append(key)
        if key == (1, 1):  # a slow decode, held until released
            started.set()
            release.wait(10)
        return level.decode_tile(key)

    cache = TileCache(max_bytes=64 << 20)
    cache.ensure((0, 0), load)
    cache.ensure((0, 0), load)  # cached: nothing decoded
    slow = threading.Thread(target=cache.get, args=((1, 1), load))
    slow.start()
    assert started.wait(10)
    t0 = time.perf_counter()
    cache.ensure((1, 1), load)  # pending in the other thread: returns without waiting or decoding
    waited = time.perf_counter() - t0
    release.set()
    slow.join(10)
    assert calls == [(0, 0), (1, 1)] and waited < 5
    assert cache.get((1, 1), load) is cache._data[(1, 1)] and calls == [(0, 0), (1, 1)]
    level.close()


def test_damaged_tile_is_a_typed_error(cmu_svs: Path, tmp_path: Path) -> None:
    import shutil

    import tifffile

    from service.errors import CorruptSlideError

    bad = tmp_path / "damaged.svs"
    shutil.copy(cmu_svs, bad)
    with open_slide(bad) as r:
        g = build_grid(r)
    x, y = (int(v) for v in g.coords[len(g) // 2])
    with tifffile.TiffFile(bad) as tif:
        page = tif.pages[0]
        index = (y // page.tilelength) * (-(-page.imagewidth // page.tilewidth)) + x // page.tilewidth
        offset, count = page.dataoffsets[index], page.databytecounts[index]
    with open(bad, "r+b") as fh:  # keep the JPEG markers' start, garble the entropy-coded data
        fh.seek(offset + count // 4)
        fh.write(b"\xff\x00" * (count // 4))
        fh.seek(offset)
        fh.write(b"\x00" * 16)
    with open_slide(bad) as r:
        assert PatchReader(r, g).mode == "fast-tiff"
        with pytest.raises(CorruptSlideError, match="cannot be decoded"):
            for _ in iter_batches(r, g, batch_size=8):
                pass


@pytest.mark.parametrize(
    ("weights", "parts", "bounds"),
    [
        ([1.0] * 42, 2, [0, 21, 42]),  # equal weights: equal counts
        ([1.0] * 64, 2, [0, 32, 64]),
        ([50.1, 0.1, 0.1, 0.1], 2, [0, 1, 4]),  # one heavy item runs alone
        ([50.1, 0.1, 0.1, 0.1], 3, [0, 1, 2, 4]),  # and the light ones still split
        ([0.1, 0.1, 0.1, 50.1], 3, [0, 2, 3, 4]),
        ([2.1, 0.1, 2.1, 0.1, 2.1, 0.1], 3, [0, 2, 4, 6]),
        ([1.0] * 3, 5, [0, 1, 2, 3]),  # more parts than items: one item each
        ([1.0], 2, [0, 1]),
    ],
)
def test_balanced_bounds(weights: list[float], parts: int, bounds: list[int]) -> None:
    from service.slides.stream import balanced_bounds

    got = balanced_bounds(np.asarray(weights), parts)
    assert got == bounds
    assert all(a < b for a, b in itertools.pairwise(got))  # no empty run


def test_a_batch_is_split_evenly_across_the_reader_threads(cmu_svs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 42-patch slide read in batches of 64 on 2 workers is read as 21 + 21, not 32 + 10 (one core doing three
    quarters of a small slide); parts stay at least MIN_PART patches, and the pixels are those of one read."""
    seen: list[tuple[int, int]] = []
    real = PatchReader.read_batch

    def spy(self, start: int, stop: int, out=None):
        seen.append((start, stop))
        return real(self, start, stop, out)

    with open_slide(cmu_svs) as reader:
        full = build_grid(reader, patch_size=224, target_mpp=0.5, tissue_threshold=0.0)
        assert len(full.coords) >= 64
        whole = PatchReader(reader, full).read_batch(0, 42)
        monkeypatch.setattr(PatchReader, "read_batch", spy)
        for n, parts in ((42, [(0, 21), (21, 42)]), (64, [(0, 32), (32, 64)]), (31, [(0, 31)])):
            grid = replace(full, coords=full.coords[:n], tissue_fraction=full.tissue_fraction[:n])
            seen.clear()
            got, _ = _collect(reader, grid, batch_size=64, workers=2)
            assert sorted(seen) == parts, (n, sorted(seen))
            if n == 42:
                np.testing.assert_array_equal(got, whole)


@pytest.mark.parametrize("target_mpp", [0.5, 128 / 224, 1.0])  # level 0; level 0 resized; level 1 (wsi2dcm's)
def test_dicom_frames_stream_through_the_tile_path_with_read_regions_pixels(dicom_dir: Path, target_mpp) -> None:
    """DICOM frames are cut like stored tiles (each decoded once by the reader's own decode, colour fix
    included), with `read_region`'s pixels, edge patches past the image white as there."""
    with open_slide(dicom_dir) as r:
        g = build_grid(r, target_mpp=target_mpp)
        pr = PatchReader(r, g)
        assert pr.mode == "fast-dicom" and len(g) > 10
        lw, lh = r.level_dimensions[g.read_level]
        ds = r.level_downsamples[g.read_level]
        for lx, ly in [(lw - 300, 0), (0, lh - 300), (lw - 150, lh - 250), (-40, -40)]:  # the edge frames
            got = pr.fast_source.read(lx, ly, (420, 330))
            assert np.array_equal(got, r.read_region((round(lx * ds), round(ly * ds)), g.read_level, (420, 330)))
        pr.close()
        fast, coords = _collect(r, g)
        generic, coords_g = _collect(r, g, fast=False)
    assert np.array_equal(coords, coords_g) and np.array_equal(fast, generic)


def test_dicom_frame_stored_cropped_at_the_edge_is_padded_white_and_an_oversized_one_refused(
    dicom_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some writers crop the last frame column/row to the image; the tile path pads them as `read_region`
    leaves what no frame covers. A frame larger than its tags say is a typed error, not a wrong cut."""
    from service.errors import CorruptSlideError
    from service.slides.readers.dicom_reader import DicomLevel

    with open_slide(dicom_dir) as r:
        level = DicomLevel(r, 0)
        full = r.decode_frame(0, 4, 5)
        monkeypatch.setattr(r, "decode_frame", lambda lvl, tx, ty: full[:467, :220])  # 2,220 x 2,967 px
        tile = level.decode_tile((4, 5))
        assert tile.shape == (500, 500, 3) and np.array_equal(tile[:467, :220], full[:467, :220])
        assert (tile[467:] == 255).all() and (tile[:, 220:] == 255).all()
        monkeypatch.setattr(r, "decode_frame", lambda lvl, tx, ty: np.zeros((501, 500, 3), np.uint8))
        with pytest.raises(CorruptSlideError, match="larger than the 500x500"):
            level.decode_tile((0, 0))


def test_sparse_dicom_series_reads_white_where_no_frame_is_stored(dicom_dir: Path, tmp_path: Path) -> None:
    """TILED_SPARSE level 0 with two frames left out (one in tissue): the tile path and `read_region` read white
    there and the full series' pixels everywhere else."""
    sparse = write_sparse_dicom(dicom_dir, tmp_path / "sparse", drop={7, 12})  # frames (2, 1) and (2, 2)
    with open_slide(dicom_dir) as full, open_slide(sparse) as r:
        assert r.level_dimensions == full.level_dimensions
        g = build_grid(full, target_mpp=0.5)
        assert (g.read_level, g.read_size, g.patch_size) == (0, 224, 224)
        pr = PatchReader(r, g)
        assert pr.mode == "fast-dicom"
        pr.close()
        ref, ref_coords = _collect(full, g)
        fast, coords = _collect(r, g)
        generic, _ = _collect(r, g, fast=False)
        assert np.array_equal(coords, ref_coords) and np.array_equal(fast, generic)
        x, y = coords[:, 0], coords[:, 1]  # the missing frames cover x 1,000-1,500, y 500-1,500
        touches = (x < 1500) & (x + 224 > 1000) & (y < 1500) & (y + 224 > 500)
        inside = (x >= 1000) & (x + 224 <= 1500) & (y >= 500) & (y + 224 <= 1500)
        assert inside.any() and np.array_equal(fast[~touches], ref[~touches])
        assert (fast[inside] == 255).all() and not (ref[inside] == 255).all()
        assert (r.read_region((1000, 500), 0, (500, 1000)) == 255).all()


@pytest.mark.parametrize(
    "syntax", ["1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.1"]
)  # JPEG 2000, HTJ2K, JPEG-LS, uncompressed
def test_dicom_series_stored_losslessly_reads_as_its_jpeg_original(
    dicom_dir: Path, tmp_path: Path, syntax: str
) -> None:
    """The sample's frames stored again losslessly as JPEG 2000, HTJ2K, JPEG-LS or uncompressed (as archives keep
    slides) stream the original's pixels, on the frame path and the generic one. JPEG-LS frames were refused
    (their SOF55 frame header was not recognised as one)."""
    j2k = write_transcoded_dicom(dicom_dir, tmp_path / "j2k", syntax)
    with open_slide(dicom_dir) as jpeg, open_slide(j2k) as r:
        g = build_grid(jpeg, target_mpp=0.5)
        ref, _ = _collect(jpeg, g)
        pr = PatchReader(r, g)
        assert pr.mode == "fast-dicom"
        pr.close()
        fast, _ = _collect(r, g)
        generic, _ = _collect(r, g, fast=False)
    assert np.array_equal(fast, ref) and np.array_equal(generic, ref)
