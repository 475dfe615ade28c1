"""Fast paths beyond tiled JPEG TIFF: NDPI restart-interval blocks, Aperio JPEG 2000 tiles (33005 and 33003) and
MIRAX camera images, pixel for pixel against OpenSlide on the real sample slides and slides built here from real
pixels."""

from __future__ import annotations

import itertools
import shutil
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import openslide
import pytest
import tifffile
from slide_fixtures import jpeg_segments, write_ndpi

from service.errors import CorruptSlideError
from service.slides import fasttiles
from service.slides.fasttiles import FastTiffSource, open_tiff_level
from service.slides.grid import build_grid
from service.slides.open import open_slide
from service.slides.stream import PatchReader, iter_batches


def _collect(reader, grid, **kw) -> np.ndarray:
    return np.concatenate([b for b, _ in iter_batches(reader, grid, **kw)])


def _openslide_patches(path: Path, grid) -> np.ndarray:
    with openslide.OpenSlide(str(path)) as s:
        return np.stack(
            [
                cv2.resize(  # OpenSlide + OpenCV: the independent reference for our reader and area_resize
                    np.asarray(s.read_region((int(x), int(y)), grid.read_level, (grid.read_size,) * 2).convert("RGB")),
                    (grid.patch_size,) * 2,
                    interpolation=cv2.INTER_AREA,
                )
                for x, y in grid.coords
            ]
        )


def _random_regions_equal(path: Path, levels, n: int = 12, size: int = 300) -> None:
    """`FastTiffSource.read` equals OpenSlide's `read_region` at random in-slide positions of every level."""
    rng = np.random.default_rng(0)
    with openslide.OpenSlide(str(path)) as s:
        for lvl in levels:
            w, h = s.level_dimensions[lvl]
            ds = s.level_downsamples[lvl]
            level = open_tiff_level(path, w, h)
            assert level is not None, lvl
            src = FastTiffSource(level)
            try:
                for _ in range(n):
                    x, y = int(rng.integers(0, w - size)), int(rng.integers(0, h - size))
                    ours = src.read(x, y, size)
                    ref = np.asarray(s.read_region((round(x * ds), round(y * ds)), lvl, (size, size)).convert("RGB"))
                    assert np.array_equal(ours, ref), (lvl, x, y, np.abs(ours.astype(int) - ref).max())
            finally:
                src.close()


def test_ndpi_blocks_equal_openslide_on_every_stored_level(ndpi: Path) -> None:
    _random_regions_equal(ndpi, range(4))


def test_ndpi_blocks_not_aligned_to_restart_numbering(ndpi: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 3 intervals start at RST3, RST6, ...: the markers must be renumbered for libjpeg."""
    monkeypatch.setattr(fasttiles, "NDPI_BLOCK_H", 24)
    level = open_tiff_level(ndpi, 1984, 2432)
    assert level is not None and level.kind == "ndpi" and level.tile_h == 24
    level.close()
    _random_regions_equal(ndpi, [1], n=6)


def test_ndpi_cache_keeps_every_block_row_a_read_spans(ndpi: Path) -> None:
    """A 245 px read spans up to 5 block rows of 64 px (whole level rows in this sample): the cache keeps them
    and the next one whatever cache size is asked for, or each patch row would decode its blocks again."""
    level = open_tiff_level(ndpi, 1984, 2432)
    assert level.kind == "ndpi" and level.tile_h == fasttiles.NDPI_BLOCK_H == 64 and level.tiles_x == 1
    row = level.tile_w * level.tile_h * 3
    assert FastTiffSource(level, cache_bytes=1, read_size=245).cache.max_bytes == 6 * row
    assert FastTiffSource(level, cache_bytes=1).cache.max_bytes == 2 * row
    assert FastTiffSource(level, cache_bytes=64 << 20, read_size=245).cache.max_bytes == 64 << 20
    level.close()


def test_ndpi_grid_streams_fast_and_equals_openslide(ndpi: Path) -> None:
    with open_slide(ndpi) as r:
        g = build_grid(r)
        assert g.read_size != g.patch_size  # 40x slide: read level 1 and area-resize
        assert PatchReader(r, g).mode == "fast-ndpi"
        ours = _collect(r, g, batch_size=8, workers=2)
    assert np.array_equal(ours, _openslide_patches(ndpi, g))


def test_ndpi_patches_whose_block_another_thread_decodes_are_read_last(ndpi: Path) -> None:
    """NDPI parts read their patches in order, not decoding ahead; a patch whose block another thread is
    decoding waits until the rest of the part is cut, then gets that block's pixels (no second decode)."""
    with open_slide(ndpi) as r:
        g = build_grid(r)
        ref = _collect(r, g, batch_size=len(g), workers=1)
        pr = PatchReader(r, g)
        src = pr.fast_source
        assert src.level.kind == "ndpi" and not src.batching
        per_patch = src.tiles_of(pr.level_coords, g.read_size)
        key = per_patch[0][-1]  # held by "another thread": the last block the first patch needs
        waiting = [i for i, keys in enumerate(per_patch) if key in keys]
        assert 0 < len(waiting) < len(g)
        claims = src.cache.claim_free([key])
        out = np.zeros((len(g), g.patch_size, g.patch_size, 3), np.uint8)
        done = threading.Event()
        reader = threading.Thread(target=lambda: (pr.read_batch(0, len(g), out), done.set()))
        reader.start()
        try:
            free = [i for i in range(len(g)) if i not in waiting]
            deadline = time.monotonic() + 30
            while not np.array_equal(out[free], ref[free]) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert np.array_equal(out[free], ref[free])  # every other patch was read while the block was held
            assert not done.is_set() and not out[waiting].any()
        finally:
            src.cache.fill_claimed(claims, src._load)
            reader.join(30)
        assert done.is_set() and np.array_equal(out, ref)
        assert src.cache.misses == len({k for keys in per_patch for k in keys})  # each block decoded once
        pr.close()


def _cmu_ndpi(cmu_svs: Path, out: Path, **kw) -> Path:
    """An NDPI of the CMU sample's 1,984 x 1,664 px labelled 40x (`write_ndpi` options in `kw`)."""
    with openslide.OpenSlide(str(cmu_svs)) as s:
        pixels = np.asarray(s.read_region((0, 0), 0, (1984, 1664)).convert("RGB"))
    return write_ndpi(pixels, out, **kw)


def _grid_streams_fast_as_openslide(path: Path) -> None:
    """A 0.5 µm/px grid on a 40x NDPI (level 1, 245 -> 224 px) streams through the block reader with OpenSlide +
    OpenCV's pixels."""
    with open_slide(path) as r:
        g = build_grid(r)
        assert (g.read_level, g.read_size) == (1, 245) and PatchReader(r, g).mode == "fast-ndpi"
        streamed = _collect(r, g, batch_size=8, workers=2)
    assert np.array_equal(streamed, _openslide_patches(path, g))


@pytest.fixture(scope="module")
def built_ndpi(cmu_svs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _cmu_ndpi(cmu_svs, tmp_path_factory.mktemp("ndpi") / "cmu-40x.ndpi")


def test_ndpi_written_here_reads_like_scanner_files(built_ndpi: Path, cmu_svs: Path) -> None:
    """The NDPI writer the bench builds large slides with: OpenSlide's hamamatsu driver opens it with the
    source's pixels; our block reader equals OpenSlide on every level and on a grid."""
    with openslide.OpenSlide(str(built_ndpi)) as s:
        assert s.properties["openslide.vendor"] == "hamamatsu" and s.level_dimensions[0] == (1984, 1664)
        assert abs(float(s.properties["openslide.mpp-x"]) - 0.2282) < 1e-4
        ours = np.asarray(s.read_region((300, 200), 0, (400, 400)).convert("RGB")).astype(int)
    with openslide.OpenSlide(str(cmu_svs)) as s:
        src = np.asarray(s.read_region((300, 200), 0, (400, 400)).convert("RGB")).astype(int)
    assert np.abs(ours - src).mean() < 2  # JPEG at quality 90, 4:4:4
    _random_regions_equal(built_ndpi, range(3), n=6, size=200)
    _grid_streams_fast_as_openslide(built_ndpi)


@pytest.fixture(scope="module")
def ndpi_row_of_intervals(cmu_svs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Rows cut into restart intervals of 31 MCUs (248 px), as in scanner files with levels too wide for one
    interval a row (most use 256 MCUs, a size this small slide cannot divide)."""
    return _cmu_ndpi(cmu_svs, tmp_path_factory.mktemp("ndpi") / "intervals.ndpi", interval_mcus=31)


@pytest.mark.parametrize("chroma_422", [False, True], ids=["4:4:4", "4:2:2"])
def test_ndpi_with_several_intervals_a_row_equals_openslide(
    cmu_svs: Path, ndpi_row_of_intervals: Path, tmp_path: Path, chroma_422: bool
) -> None:
    """Blocks join several intervals of a row (4 x 248 px) and of 8 rows, restart markers renumbered across
    both; the pixels equal OpenSlide's, which decodes interval by interval, on every level and on a grid. With
    chroma halved across (4:2:2) libjpeg would upsample it from the next interval's at interval borders, where
    OpenSlide repeats the edge: blocks are then one interval wide (and equal OpenSlide's too)."""
    path = ndpi_row_of_intervals
    if chroma_422:  # 16 x 8 px MCUs: intervals of 31 are 496 px
        path = _cmu_ndpi(cmu_svs, tmp_path / "intervals-422.ndpi", interval_mcus=31, chroma_422=True)
    iw = 496 if chroma_422 else 248
    with openslide.OpenSlide(str(path)) as s:
        assert s.properties["openslide.level[0].tile-width"] == str(iw)  # OpenSlide's tile: one interval
    level = open_tiff_level(path, 992, 832)
    assert level is not None and (level.iw, level.ih, level.tile_h) == (iw, 8, 64)
    assert level.gx == (1 if chroma_422 else 4)
    level.close()
    _random_regions_equal(path, range(3), n=8, size=300)
    _grid_streams_fast_as_openslide(path)


def test_ndpi_level_wider_than_a_jpeg_can_be_equals_openslide(cmu_svs: Path, tmp_path: Path) -> None:
    """Level 0 of most 40x slides is wider than libjpeg's 65,500 px: such a level is one JPEG whose frame says
    width 0, cut into 2,048 px intervals (256 MCUs, as in most scanner files). OpenSlide reads it interval by
    interval; our blocks (one interval wide) equal it across the whole width, past 65,535 px too."""
    with openslide.OpenSlide(str(cmu_svs)) as s:
        strip = np.asarray(s.read_region((0, 0), 0, (2220, 64)).convert("RGB"))
    width = 34 * 2048
    path = write_ndpi(strip[:, np.arange(width) % 2220], tmp_path / "wide.ndpi", levels=2, interval_mcus=256)
    with tifffile.TiffFile(path) as tif:
        at = tif.pages[0].tags[273].value[0]  # StripOffsets: the level's JPEG
    head = path.read_bytes()[at : at + 1024]
    sof = jpeg_segments(head)[0xC0][0]
    assert head[sof + 5 : sof + 9] == b"\x00\x40\x00\x00"  # frame: 64 rows, width 0
    level = open_tiff_level(path, width, 64)
    assert level is not None and (level.iw, level.gx, level.tile_w, level.tiles_x) == (2048, 1, 2048, 34)
    src = FastTiffSource(level)
    with openslide.OpenSlide(str(path)) as s:
        assert s.level_dimensions[0] == (width, 64)
        for x in (0, 30_001, 65_300, 65_536, width - 300):
            ref = np.asarray(s.read_region((x, 0), 0, (300, 64)).convert("RGB"))
            assert np.array_equal(src.read(x, 0, (300, 64)), ref), x
    src.close()


def test_ndpi_without_mcu_starts_reads_through_the_generic_path(cmu_svs: Path, tmp_path: Path) -> None:
    """Without McuStarts nothing says where the intervals are: tifffile sees one strip, the block reader stays
    out of it and the generic reader (OpenSlide, which scans for the markers) analyses the slide."""
    path = _cmu_ndpi(cmu_svs, tmp_path / "no-mcu-starts.ndpi", mcu_starts=False)
    assert open_tiff_level(path, 992, 832) is None
    with open_slide(path) as r:
        g = build_grid(r)
        assert PatchReader(r, g).mode != "fast-ndpi"
        patches = _collect(r, g, batch_size=8, workers=2)
    assert len(patches) == len(g) > 0 and np.array_equal(patches, _openslide_patches(path, g))


def _mcu_starts_at(path: Path, page: int) -> tuple[int, np.ndarray]:
    """(file offset of the McuStarts values, the values) of one NDPI page."""
    with tifffile.TiffFile(path) as tif:
        tag = tif.pages[page].tags[65426]
        return tag.valueoffset, np.asarray(tag.value, dtype=np.uint32)


@pytest.mark.parametrize("shift", ["next interval", "3 bytes in", "backwards"])
def test_damaged_mcu_starts_are_a_typed_error(ndpi_row_of_intervals: Path, tmp_path: Path, shift: str) -> None:
    """An McuStarts entry pointing at the wrong restart interval (data that decodes, to the wrong place) or
    into the middle of one fails the block that uses it with a reason, where a decoder would give wrong pixels
    silently; one going backwards is taken for a 4 GB wrap and then points past the file's end, also named;
    blocks not using it still read."""
    bad = tmp_path / "bad-mcu-starts.ndpi"
    shutil.copy(ndpi_row_of_intervals, bad)
    at, starts = _mcu_starts_at(bad, 1)  # level 1: 4 intervals a row, 1 block a row
    k = 4 * 40 + 2  # row 40 (block row 5), third interval
    starts[k] = {"next interval": starts[k + 1], "3 bytes in": starts[k] + 3, "backwards": starts[k - 1] - 1}[shift]
    with open(bad, "r+b") as fh:
        fh.seek(at)
        fh.write(starts.tobytes())
    level = open_tiff_level(bad, 992, 832)
    src = FastTiffSource(level)
    assert src.read(0, 0, (992, 64)).shape == (64, 992, 3)  # block row 0 is intact
    reason = (
        r"end at byte .*\(McuStarts damaged" if shift == "backwards" else "interval 162 does not follow marker RST1"
    )
    with pytest.raises(CorruptSlideError, match=rf"NDPI block \(0, 5\).*{reason}"):
        src.read(0, 5 * 64, (992, 64))
    src.close()


def test_tiff_tiles_out_of_order_or_missing_read_as_stored(cmu_svs: Path, tmp_path: Path) -> None:
    """TIFF tiles may sit anywhere in the file and in any order, and a tile with no bytes (offset and count 0)
    is white: the fast path takes each tile's offset and count as stored (NDPI's interval arithmetic, which
    assumes intervals in file order, is for NDPI only)."""
    with openslide.OpenSlide(str(cmu_svs)) as s:
        pixels = np.asarray(s.read_region((0, 0), 0, (768, 512)).convert("RGB"))
    path = tmp_path / "tiles.tif"
    tifffile.imwrite(path, pixels, tile=(256, 256), compression="jpeg", photometric="rgb")
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        offsets_at, counts_at = page.tags[324].valueoffset, page.tags[325].valueoffset
        offsets = np.asarray(page.dataoffsets, np.uint32)
        counts = np.asarray(page.databytecounts, np.uint32)
        expected = page.asarray()
    order = [5, 4, 3, 2, 1, 0]  # the tiles' bytes, last tile first
    data = b"".join(path.read_bytes()[offsets[i] : offsets[i] + counts[i]] for i in order)
    new_offsets = np.zeros(6, np.uint32)
    at = path.stat().st_size
    for i in order:
        new_offsets[i], at = at, at + counts[i]
    new_offsets[1], counts[1] = 0, 0  # tile (1, 0) stored nowhere
    with open(path, "r+b") as fh:
        fh.seek(0, 2)
        fh.write(data)
        fh.seek(offsets_at)
        fh.write(new_offsets.tobytes())
        fh.seek(counts_at)
        fh.write(counts.tobytes())
    level = open_tiff_level(path, 768, 512)
    assert level is not None and level.kind == "tiff"
    src = FastTiffSource(level)
    got = src.read(0, 0, (768, 512))
    src.close()
    assert (got[:256, 256:512] == 255).all()
    expected[:256, 256:512] = 255
    assert np.array_equal(got, expected)


def test_cmyk_jpeg_tiff_keeps_the_generic_path(cmu_svs: Path, tmp_path: Path) -> None:
    """A tiled JPEG TIFF in CMYK (Photometric separated, 4 samples): the fast path took its C, M, Y for R, G, B
    (110-200 levels off OpenSlide, and a tissue mask with 12 patches more). It is not taken; the stream equals
    OpenSlide's conversion."""
    with openslide.OpenSlide(str(cmu_svs)) as s:
        rgb = np.asarray(s.read_region((600, 1000), 0, (768, 512)).convert("RGB")).astype(np.float64) / 255
    k = 1 - rgb.max(axis=2, keepdims=True)
    cmy = (1 - rgb - k) / np.maximum(1 - k, 1e-6)
    cmyk = np.round(np.dstack([cmy, k]) * 255).astype(np.uint8)
    path = tmp_path / "cmyk.tif"
    tifffile.imwrite(
        path,
        cmyk,
        tile=(256, 256),
        photometric="separated",
        compression="jpeg",
        resolution=(20000, 20000),
        resolutionunit="CENTIMETER",
    )
    assert open_tiff_level(path, 768, 512) is None
    with open_slide(path) as r, openslide.OpenSlide(str(path)) as o:
        grid = build_grid(r, target_mpp=0.5, patch_size=128, tissue_threshold=0)
        got = _collect(r, grid)
        want = np.stack(
            [np.asarray(o.read_region((int(x), int(y)), 0, (128, 128)).convert("RGB")) for x, y in grid.coords]
        )
    assert len(grid.coords) > 10 and np.array_equal(got, want)


def test_mcu_starts_wrapped_past_4_gb_are_undone() -> None:
    """Files past 4 GB whose McuStartsHighBytes stay 0 where the 32-bit McuStarts wrap: the offsets drop
    mid-level, and every drop is taken as a wrap, so each interval gets its true offset and length back."""
    strip_at = 4096
    for base in (2**32, 2**33):  # high bytes stuck at 0, then stuck at 1
        rel = np.array([0, base - 300, base - 100, base + 50, base + 400, base + 900], np.int64)  # McuStarts
        strip_bytes = base + 1200
        stuck = rel - np.where(rel >= base, 2**32, 0)
        # tifffile: offsets = strip offset + McuStarts, counts = their differences and the strip's end
        offsets, counts = fasttiles.ndpi_interval_spans(strip_at + stuck, np.diff(stuck, append=strip_bytes))
        assert offsets.tolist() == (strip_at + rel).tolist()
        assert counts.tolist() == np.diff(rel, append=strip_bytes).tolist()
        intact = fasttiles.ndpi_interval_spans(strip_at + rel, np.diff(rel, append=strip_bytes))
        assert intact[0].tolist() == offsets.tolist() and intact[1].tolist() == counts.tolist()  # left alone


def test_j2k_svs_fast_path(tcga_j2k_svs: Path) -> None:
    _random_regions_equal(tcga_j2k_svs, [0], n=8)  # level 1 has a fractional downsample (2.0005)
    with open_slide(tcga_j2k_svs, mpp_override=0.5) as r:  # level 0, whole level pixels: identical
        g = build_grid(r)
        assert g.read_level == 0 and PatchReader(r, g).mode == "fast-tiff"
        ours = _collect(r, g, batch_size=16)
    assert np.array_equal(ours, _openslide_patches(tcga_j2k_svs, g))
    with open_slide(tcga_j2k_svs, mpp_override=0.25) as r:  # level 1, downsample 2.0005
        g = build_grid(r)
        assert g.read_level == 1 and PatchReader(r, g).snapped
        snapped = _collect(r, g, batch_size=16)
        exact = _collect(r, g, batch_size=16, fast="exact")
        assert PatchReader(r, g, fast="exact").mode == "read_region"
    ref = _openslide_patches(tcga_j2k_svs, g)
    assert np.array_equal(exact, ref)
    diff = np.abs(snapped.astype(int) - ref)
    assert 0 < diff.mean() < 8, diff.mean()  # nearest pixel vs OpenSlide's sub-pixel resampling


@pytest.fixture(scope="module")
def aperio_33003(cmu_svs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from slide_fixtures import write_aperio_j2k_ycbcr

    if shutil.which("opj_compress") is None:
        pytest.skip("opj_compress (Debian libopenjp2-tools, in tests/sysdeps.sh) builds the 33003 slide")
    return write_aperio_j2k_ycbcr(cmu_svs, tmp_path_factory.mktemp("j2k") / "cmu-33003.svs")


@pytest.fixture
def ensured(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The tile keys decoded ahead (`TileCache.ensure`), in call order."""
    keys: list[tuple[int, int]] = []
    real_ensure = fasttiles.TileCache.ensure

    def spy(self, key, load):
        keys.append(key)
        return real_ensure(self, key, load)

    monkeypatch.setattr(fasttiles.TileCache, "ensure", spy)
    return keys


def test_j2k_batches_split_by_tiles_and_decode_ahead(tcga_j2k_svs: Path, ensured: list[tuple[int, int]]) -> None:
    """JPEG 2000 batches are split where the tiles to decode are even (each tile counted for the last patch that
    touches it: the later run starts on shared tiles), every part decodes its tiles before cutting, and the
    pixels are those of one plain read whatever the split, the cache size or the thread count."""
    with open_slide(tcga_j2k_svs, mpp_override=0.25) as r:
        g = build_grid(r)
        pr = PatchReader(r, g)
        n = len(g)
        bounds = pr.split(0, n, 2)
        assert bounds[0] == 0 and bounds[-1] == n and len(bounds) == 3
        tiles = pr.fast_source.tiles_of(pr.level_coords, g.read_size)
        later = set().union(*tiles[bounds[1] :])
        work = [len(set().union(*tiles[: bounds[1]]) - later), len(later)]
        assert abs(work[0] - work[1]) <= 4, work  # tiles to decode per part, about even
        assert bounds != [0, -(-n // 2), n]  # not the count split (the second half has more tiles)
        for parts in (1, 3, n, n + 5):
            b = pr.split(0, n, parts)
            assert b[0] == 0 and b[-1] == n and all(x < y for x, y in itertools.pairwise(b))
        whole = pr.read_batch(0, n)
        for kw in ({"workers": 2}, {"workers": 3, "batch_size": 16}, {"workers": 2, "cache_mb": 1}):
            ensured.clear()
            assert np.array_equal(_collect(r, g, **kw), whole), kw
            if "cache_mb" in kw:  # a 1 MB cache cannot hold a part's tiles: no decoding ahead, same pixels
                assert not ensured
            else:
                assert set(ensured) == set().union(*tiles)


def test_jpeg_and_mirax_parts_decode_ahead_ndpi_does_not(
    cmu_svs: Path, mirax: Path, ndpi: Path, ensured: list[tuple[int, int]]
) -> None:
    """Every part of a batch decodes the JPEG tiles / MIRAX images it needs before cutting (both threads keep
    decoding where their patches share tiles); NDPI blocks are not decoded ahead (measured slower). The
    pixels stay OpenSlide's."""
    for path, ahead in ((cmu_svs, True), (mirax, True), (ndpi, False)):
        ensured.clear()
        with open_slide(path) as r:
            g = build_grid(r)
            pr = PatchReader(r, g)
            tiles = set().union(*pr.fast_source.tiles_of(pr.level_coords, g.read_size))
            ours = _collect(r, g, workers=2, batch_size=32)
        assert (set(ensured) == tiles) if ahead else not ensured, path.name
        assert np.array_equal(ours, _openslide_patches(path, g)), path.name


def test_j2k_ycbcr_33003_fast_path_equals_openslide(aperio_33003: Path, cmu_svs: Path) -> None:
    """Aperio 33003: YCbCr J2K tiles with chroma halved horizontally; our decode (raw components + OpenSlide's
    conversion tables) gives OpenSlide's pixels, which are the source's colours (not a YCbCr cast)."""
    with tifffile.TiffFile(aperio_33003) as tif:
        assert tif.pages[0].compression == fasttiles.APERIO_J2K_YCBCR
    _random_regions_equal(aperio_33003, [0], n=8)
    with open_slide(aperio_33003) as r:
        assert r.vendor == "aperio"
        g = build_grid(r)
        assert PatchReader(r, g).mode == "fast-tiff" and len(g) >= 4
        ours = _collect(r, g, batch_size=4)
    assert np.array_equal(ours, _openslide_patches(aperio_33003, g))
    with openslide.OpenSlide(str(aperio_33003)) as s, openslide.OpenSlide(str(cmu_svs)) as src:
        built = np.asarray(s.read_region((0, 0), 0, (512, 512)).convert("RGB")).astype(int)
        real = np.asarray(src.read_region((768, 768), 0, (512, 512)).convert("RGB")).astype(int)
    assert np.abs(built - real).mean() < 8  # 4:2:2 chroma and lossy J2K of the same real pixels
    assert np.abs((built - real).mean(axis=(0, 1))).max() < 2  # and no colour cast in any channel


def test_33003_pixels_do_not_depend_on_the_openjpeg_binding(
    aperio_33003: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ctypes decode (GIL free) and the Pillow fallback (where no libopenjp2 loads) give the same RGB tiles,
    in full and at reduced resolution."""
    from service.slides import openjpeg

    level = open_tiff_level(aperio_33003, 1024, 768)
    keys = [(0, 0), (2, 1), (3, 2)]
    try:
        assert openjpeg.available()
        ctypes_tiles = [level.decode_tile(k) for k in keys] + [level.decode_reduced(k, 2) for k in keys]
        monkeypatch.setattr(openjpeg, "_library", lambda: None)
        assert not openjpeg.available()
        pillow_tiles = [level.decode_tile(k) for k in keys] + [level.decode_reduced(k, 2) for k in keys]
    finally:
        level.close()
    for a, b in zip(ctypes_tiles, pillow_tiles, strict=True):
        assert a.shape == b.shape and np.array_equal(a, b)


def test_damaged_33003_tile_is_a_typed_error(aperio_33003: Path, tmp_path: Path) -> None:
    bad = tmp_path / "damaged.svs"
    shutil.copy(aperio_33003, bad)
    with tifffile.TiffFile(bad) as tif:
        start = tif.pages[0].dataoffsets[5]
    with open(bad, "r+b") as fh:  # a codestream whose SIZ segment is cut short
        fh.seek(start)
        fh.write(b"\xff\x4f\xff\x51" + b"\x00" * 50)
    src = FastTiffSource(open_tiff_level(bad, 1024, 768))
    with pytest.raises(CorruptSlideError, match=r"stored tile \(1, 1\).*cannot be decoded"):
        src.read(256, 256, 256)
    src.close()


def test_j2k_tile_claiming_a_huge_image_is_refused_before_decoding(tcga_j2k_svs: Path, tmp_path: Path) -> None:
    """A 33005 tile whose codestream header claims 60,000 x 60,000 px (imagecodecs' decoder grew the process to
    24 GB on such a tile until the kernel killed it) is a corrupt_slide error from the header bytes alone, in
    full and reduced reads, and the slide's other tiles still read."""
    import resource

    bad = tmp_path / "bomb.svs"
    shutil.copy(tcga_j2k_svs, bad)
    with tifffile.TiffFile(bad) as tif:
        page = next(p for p in tif.pages if p.compression == fasttiles.APERIO_J2K_RGB and p.is_tiled)
        w, h, start = page.imagewidth, page.imagelength, page.dataoffsets[0]
    with open(bad, "r+b") as fh:  # SOC, SIZ marker, Lsiz, Rsiz, then Xsiz and Ysiz
        fh.seek(start + 8)
        fh.write((60_000).to_bytes(4, "big") * 2)
    level = open_tiff_level(bad, w, h)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        with pytest.raises(CorruptSlideError, match=r"stored tile \(0, 0\).*60000x60000 px, not the 256x256"):
            level.decode_tile((0, 0))
        with pytest.raises(CorruptSlideError, match="60000x60000"):
            level.decode_reduced((0, 0), 3)
        assert level.decode_tile((1, 0)).shape == (256, 256, 3)  # the other tiles still read
    finally:
        level.close()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KB: no gigabytes taken


def _area(img: np.ndarray, f: int) -> np.ndarray:
    h, w = -(-img.shape[0] // f), -(-img.shape[1] // f)
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)


def _low_pass_close(small: np.ndarray, area: np.ndarray) -> None:
    """The wavelet low-pass band keeps more fine texture than a box average (per-pixel mean |d| 9-20 on tissue
    tiles of the TCGA sample and the built 33003 slide), but carries the same colours: channel means within
    1.5 levels (a YCbCr or channel mix-up moves them by tens), and close once both are blurred a little."""
    d = small.astype(int) - area
    assert np.abs(d.mean(axis=(0, 1))).max() < 1.5, d.mean(axis=(0, 1))
    blurred = cv2.GaussianBlur(small, (0, 0), 1).astype(int) - cv2.GaussianBlur(area, (0, 0), 1)
    assert 0 < np.abs(blurred).mean() < 7, np.abs(blurred).mean()


@pytest.mark.parametrize("fmt", ["33005", "33003"])
def test_j2k_reduced_resolution_decode(fmt: str, tcga_j2k_svs: Path, aperio_33003: Path) -> None:
    """Reduced-resolution JPEG 2000 decoding: at reduce 0 exactly the full decode; coarser, the wavelet
    low-pass band, with the colours of an area average of the full tile (not its pixels), and a whole level
    assembles at the right size."""
    path = tcga_j2k_svs if fmt == "33005" else aperio_33003
    with openslide.OpenSlide(str(path)) as s:
        w, h = s.level_dimensions[-1 if fmt == "33005" else 0]
    level = open_tiff_level(path, w, h)
    assert level is not None and level.codec == "jpeg2000"
    try:
        key = (level.tiles_x // 2, level.tiles_y // 2)
        full = level.decode_tile(key)
        assert np.array_equal(level.decode_reduced(key, 0), full)
        for r in (1, 3):
            small = level.decode_reduced(key, r)
            assert small.shape == (level.tile_h >> r, level.tile_w >> r, 3)
            _low_pass_close(small, _area(full, 1 << r))
        whole = fasttiles.read_level_reduced(level, 2)
        assert whole.shape == (-(-h // 4), -(-w // 4), 3)
        _low_pass_close(whole, _area(FastTiffSource(open_tiff_level(path, w, h)).read(0, 0, (w, h)), 4))
        with pytest.raises(CorruptSlideError, match="1/64 resolution"):
            level.decode_reduced(key, 6)  # Aperio codes 5 wavelet levels
    finally:
        level.close()


def test_tissue_mask_of_j2k_slide_reads_reduced_resolution(tcga_j2k_svs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The mask image of a JPEG 2000 slide comes from reduced-resolution tile decodes; against the full decode
    plus area resize its pixels differ (TCGA sample: mean |d| 5.0, the wavelet low-pass band), its mask by
    about 1 % of pixels, and the grid is the same."""
    from service.slides import tissue

    calls: list[int] = []
    real = fasttiles.read_level_reduced
    monkeypatch.setattr(fasttiles, "read_level_reduced", lambda lv, r: calls.append(r) or real(lv, r))
    with open_slide(tcga_j2k_svs, mpp_override=0.25) as r:
        reduced = tissue.mask_image(r, 0.25)
        grid = build_grid(r)
        assert calls and calls[0] == 4  # level 1 (2x) read at 1/16 for a 32x (8 µm/px) mask
        monkeypatch.setattr(tissue, "_reduced_j2k", lambda *a: None)  # the full-decode path, for reference
        full = tissue.mask_image(r, 0.25)
        full_grid = build_grid(r)
    assert reduced.shape == full.shape
    _low_pass_close(reduced, full)
    with open_slide(tcga_j2k_svs, mpp_override=0.25) as r:
        mask_full = tissue.tissue_mask(r, mpp=0.25).mask
        monkeypatch.undo()
        mask_reduced = tissue.tissue_mask(r, mpp=0.25).mask
    assert (mask_full != mask_reduced).mean() < 0.02  # 149 of 15,429 mask pixels when measured
    assert np.array_equal(grid.coords, full_grid.coords)


def test_j2k_thumbnail_reads_reduced_resolution(tcga_j2k_svs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A thumbnail of a JPEG 2000 slide far smaller than its level: reduced-resolution decode, then the box
    filter; the same size and colours as the full decode's thumbnail (the TCGA sample: mean |d| about 6)."""
    from service.slides import thumbnail

    with open_slide(tcga_j2k_svs, mpp_override=0.25) as r:
        calls: list[float] = []
        real = fasttiles.reduced_j2k_image
        monkeypatch.setattr(fasttiles, "reduced_j2k_image", lambda *a: calls.append(a[-1]) or real(*a))
        reduced = thumbnail.thumbnail_from_levels(r, 512)
        assert calls
        monkeypatch.setattr(fasttiles, "reduced_j2k_image", lambda *a: None)
        full = thumbnail.thumbnail_from_levels(r, 512)
    assert reduced.shape == full.shape == (411, 512, 3)
    _low_pass_close(reduced, full)


def test_damaged_j2k_tile_in_mask_read_is_a_typed_error(aperio_33003: Path, tmp_path: Path) -> None:
    from service.slides import tissue

    bad = tmp_path / "damaged.svs"
    shutil.copy(aperio_33003, bad)
    with tifffile.TiffFile(bad) as tif:
        start = tif.pages[0].dataoffsets[5]
    with open(bad, "r+b") as fh:
        fh.seek(start)
        fh.write(b"\xff\x4f\xff\x51" + b"\x00" * 50)
    with open_slide(bad) as r, pytest.raises(CorruptSlideError, match=r"stored tile \(1, 1\)"):
        tissue.mask_image(r, 0.5)


def test_damaged_ndpi_block_is_a_typed_error(ndpi: Path, tmp_path: Path) -> None:
    bad = tmp_path / "damaged.ndpi"
    shutil.copy(ndpi, bad)
    with tifffile.TiffFile(bad) as tif:
        page = tif.pages[1]
        start = page.dataoffsets[len(page.dataoffsets) // 2]  # a restart interval in the middle
    with open(bad, "r+b") as fh:  # frame markers where entropy-coded data should be
        fh.seek(start)
        fh.write(b"\xff\xc0\x00\x04" * 200)
    level = open_tiff_level(bad, 1984, 2432)
    assert level is not None
    src = FastTiffSource(level)
    with pytest.raises(CorruptSlideError, match="cannot be decoded"):
        for ty in range(level.tiles_y):
            src.read(0, ty * level.tile_h, (level.width, level.tile_h))
    src.close()


def _damage(data: bytes, how: str) -> bytes:
    """`data` (entropy-coded JPEG bytes) with its middle half garbled or zeroed, leaving every 0xFF and the byte
    after it as they are, so no marker appears or disappears: damage that libjpeg only warns about."""
    out = bytearray(data)
    for i in range(len(data) // 4, 3 * len(data) // 4):
        if data[i] == 0xFF or data[i - 1] == 0xFF:
            continue
        new = data[i] ^ 0x5A if how == "garbled" else 0
        out[i] = data[i] if new == 0xFF else new
    return bytes(out)


@pytest.mark.parametrize("fmt", ["svs", "ndpi"])
@pytest.mark.parametrize("how", ["garbled", "zeroed"])
def test_damaged_jpeg_data_is_refused_as_openslide_refuses_it(
    fmt: str, how: str, cmu_svs: Path, ndpi: Path, tmp_path: Path
) -> None:
    """The middle of one SVS tile's or NDPI restart interval's entropy-coded data garbled or zeroed, its markers
    intact. libjpeg only warns about such data and fills in wrong pixels; OpenSlide turns the warning into an
    error and refuses the tile, while the fast path (imagecodecs, the control below) decoded it without a word,
    so an analysis ran on the damaged pixels. The fast path and the streaming reader now refuse it, naming
    the tile."""
    import imagecodecs

    # SVS: tile (4, 0) of level 0; NDPI: restart interval 137 of level 1 (rows 1,096-1,103), in block (0, 17)
    src_path, page_index, (w, h), k = (cmu_svs, 0, (2220, 2967), 4) if fmt == "svs" else (ndpi, 1, (1984, 2432), 137)
    bad = tmp_path / f"damaged.{fmt}"
    shutil.copy(src_path, bad)
    with tifffile.TiffFile(bad) as tif:
        at, count = int(tif.pages[page_index].dataoffsets[k]), int(tif.pages[page_index].databytecounts[k])
    raw = bad.read_bytes()
    bad.write_bytes(raw[:at] + _damage(raw[at : at + count], how) + raw[at + count :])
    level = open_tiff_level(bad, w, h)
    assert level is not None and level.kind == ("tiff" if fmt == "svs" else "ndpi")
    key = (4, 0) if fmt == "svs" else (0, 137 * 8 // level.tile_h)
    damaged = imagecodecs.jpeg8_decode(level.stream(key) if fmt == "svs" else level._block_stream(key))
    assert damaged.shape[:2] == (level.tile_h, level.tile_w)  # the control: decoded, no error
    with pytest.raises(CorruptSlideError, match="damaged JPEG data"):
        level.decode_tile(key)
    level.close()
    with openslide.OpenSlide(str(bad)) as o, pytest.raises(openslide.OpenSlideError, match="JPEG"):
        if fmt == "svs":
            o.read_region((960, 0), 0, (240, 240))
        else:
            o.read_region((0, 2 * 1096), 1, (1984, 8))
    with open_slide(bad) as r, pytest.raises(CorruptSlideError, match="damaged JPEG data"):
        grid = build_grid(r, target_mpp=r.mpp.x * r.level_downsamples[page_index], patch_size=64, tissue_threshold=0)
        for _ in iter_batches(r, grid):
            pass


def test_tiling_bench_row_for_a_real_slide(ndpi: Path) -> None:
    """bench/tiling.py measures one format end to end (tiny, one repeat): keeps the benchmark runnable."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_tiling", Path(__file__).parents[1] / "bench" / "tiling.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    row = bench.bench_slide("NDPI", ndpi, None, repeats=1, max_patches=20)
    assert row["mode"] == "fast-ndpi" and row["measured"] == 20 and row["baseline"] == "openslide"
    assert row["samples"] == 1 and bench.samples(3, 65) == 15 and bench.samples(3, 606) == 3
    assert bench.samples(3, 3501) == 3 and bench.samples(5, 200) == 8
    assert row["ours"] > 0 and row["loop"] > 0 and row["ceiling"] > 0 and row["max_abs_diff"] == 0
    assert row["cpu_resize"] > 0 and row["cpu_resize_cv2"] > 0  # 245 -> 224 px
    generic = bench.bench_slide("NDPI" + bench.GENERIC, ndpi, None, repeats=1, max_patches=20, fast=False)
    assert generic["mode"] == "read_region" and "ceiling" not in generic and generic["max_abs_diff"] == 0
    with open_slide(ndpi) as r:
        grid = bench._subset(build_grid(r), 20)
    parts = bench.breakdown(ndpi, grid, None, repeats=1)
    assert set(parts) == {
        "openslide_read",
        "ours_cold",
        "decode_once",
        "cut",
        "resize",
        "resize_cv2",
        "other",
        "best_ratio",
    }
    assert min(parts["openslide_read"], parts["decode_once"], parts["cut"], parts["resize"]) > 0
    rows = {r["way"]: r for r in bench.resize_candidates(245, 224, n=2)}
    assert rows["area_resize (resize_patch)"]["max"] == 0 and rows["cv2 INTER_AREA (uint8)"]["max"] == 0
    assert rows["scipy sparse exact weights"]["max"] <= 1  # the exact area weights agree with OpenCV's
    assert all(r["cpu_ms"] > 0 for r in rows.values())


@pytest.fixture(scope="module")
def mirax(cmu_svs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from slide_fixtures import write_mirax

    return write_mirax(cmu_svs, tmp_path_factory.mktemp("mirax") / "cmu.mrxs")


def test_mirax_built_here_reads_like_the_svs(mirax: Path, cmu_svs: Path) -> None:
    with open_slide(mirax) as r, open_slide(cmu_svs) as svs:
        assert r.vendor == "mirax" and r.level_count == 3 and r.mpp is not None
        assert abs(r.mpp.x - 0.499) < 1e-3
        diff = np.abs(r.read_region((500, 700), 0, (400, 400)).astype(int) - svs.read_region((500, 700), 0, (400, 400)))
    assert diff.mean() < 3  # the same real pixels, JPEG-recompressed at quality 90


def test_mirax_fast_path_equals_openslide(mirax: Path) -> None:
    _random_regions_equal(mirax, range(3), n=8)
    with open_slide(mirax) as r:
        for target in (0.5, 1.0):
            g = build_grid(r, target_mpp=target)
            assert PatchReader(r, g).mode == "fast-mrxs" and len(g) > 5
            ours = _collect(r, g, batch_size=8)
            assert np.array_equal(ours, _openslide_patches(mirax, g)), target


def test_mirax_with_positions_or_overlap_keeps_the_generic_path(mirax: Path, tmp_path: Path) -> None:
    folder = tmp_path / "cmu"
    shutil.copytree(mirax.with_suffix(""), folder)
    shutil.copy(mirax, tmp_path / "cmu.mrxs")
    ini = (folder / "Slidedat.ini").read_text().replace("OVERLAP_X=0", "OVERLAP_X=8", 1)
    (folder / "Slidedat.ini").write_text(ini)
    assert open_tiff_level(tmp_path / "cmu.mrxs", 2304, 3072) is None
    (folder / "Index.dat").write_bytes(b"garbage")
    assert open_tiff_level(tmp_path / "cmu.mrxs", 2304, 3072) is None


@pytest.mark.parametrize("fmt", ["svs", "ndpi", "mrxs"])
def test_tile_buffers_recycled_under_eviction_keep_pixels(fmt: str, cmu_svs: Path, ndpi: Path, mirax: Path) -> None:
    """A cache far smaller than the level evicts all the time and decodes into recycled buffers: every read
    still equals a fresh decode, and buffers were really reused."""
    path = {"svs": cmu_svs, "ndpi": ndpi, "mrxs": mirax}[fmt]
    with openslide.OpenSlide(str(path)) as s:
        w, h = s.level_dimensions[1 if fmt == "ndpi" else 0]
    rng = np.random.default_rng(1)
    spots = [(int(rng.integers(0, w - 300)), int(rng.integers(0, h - 300))) for _ in range(40)]
    big = FastTiffSource(open_tiff_level(path, w, h), cache_bytes=1 << 30)
    small = FastTiffSource(open_tiff_level(path, w, h), cache_bytes=1)  # NDPI: its floor of two block rows
    small.cache.max_bytes = 3 * small.level.tile_h * 1984 * 3 if fmt == "ndpi" else 4 * 256 * 256 * 3
    try:
        for x, y in spots:
            assert np.array_equal(small.read(x, y, 300), big.read(x, y, 300)), (x, y)
        assert small.cache.reused > 0 and small.cache.misses > big.cache.misses
    finally:
        big.close()
        small.close()
