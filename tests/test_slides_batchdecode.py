"""The batch tile decoder (nvImageCodec): through its CPU backends here, which run the same calls as its GPU ones,
every fast-path format streams the CPU path's pixels, damaged tiles fail as they do there, and asking for a GPU
decoder where none can run is a clear error before any slide is read."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile

from service.errors import CorruptSlideError, InvalidParameterError
from service.slides import batchdecode
from service.slides.fasttiles import FastTiffSource, complete_jpeg, open_tiff_level
from service.slides.grid import build_grid
from service.slides.open import open_slide
from service.slides.stream import PatchReader, iter_batches

pytest.importorskip("nvidia.nvimgcodec", reason="nvidia-nvimgcodec-cu13 (extra gpu-decode; the CPU package: make test)")

CPU_BACKEND = "nvimgcodec-cpu"


@pytest.fixture
def decoder() -> batchdecode.BatchDecoder:
    dec = batchdecode.batch_decoder(CPU_BACKEND)
    dec.decoded = dec.rejected = 0
    return dec


def _cmu_pixels(cmu_svs: Path, w: int = 1984, h: int = 1664) -> np.ndarray:
    with openslide.OpenSlide(str(cmu_svs)) as s:
        return np.asarray(s.read_region((0, 0), 0, (w, h)).convert("RGB"))


@pytest.fixture(scope="module")
def built(cmu_svs: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The fast path's other layouts, built from the CMU sample's real pixels."""
    from slide_fixtures import write_aperio_j2k_ycbcr, write_mirax, write_ndpi, write_ome_tiff

    d = tmp_path_factory.mktemp("batchdecode")
    px = _cmu_pixels(cmu_svs)
    out = {
        "ome-tiff": write_ome_tiff(cmu_svs, d / "cmu.ome.tif"),
        "mrxs": write_mirax(cmu_svs, d / "cmu.mrxs"),
        "ndpi, whole-row intervals": write_ndpi(px, d / "rows.ndpi"),
        "ndpi, 248 px intervals": write_ndpi(px, d / "intervals.ndpi", interval_mcus=31),
        "ndpi, 4:2:2": write_ndpi(px, d / "chroma422.ndpi", interval_mcus=31, chroma_422=True),
    }
    if shutil.which("opj_compress") is not None:
        out["33003"] = write_aperio_j2k_ycbcr(cmu_svs, d / "cmu-33003.svs")
    return out


def _stream(path: Path, mpp: float | None, **kw) -> tuple[np.ndarray, str]:  # kw: iter_batches' options
    with open_slide(path, mpp_override=mpp) as r:
        g = build_grid(r)
        mode = PatchReader(r, g).mode
        return np.concatenate([b for b, _ in iter_batches(r, g, batch_size=16, workers=2, **kw)]), mode


@pytest.mark.parametrize(
    "name",
    [
        "cmu_svs",  # Aperio's RGB-coded JPEG: the Adobe segment carries tifffile's colour space
        "tcga_j2k_svs",  # Aperio 33005 JPEG 2000
        "ndpi",  # the real NDPI sample
        "ome-tiff",  # YCbCr JPEG with a JFIF-less stream: as stored
        "mrxs",
        "ndpi, whole-row intervals",
        "ndpi, 248 px intervals",
        "ndpi, 4:2:2",
    ],
)
def test_batch_decoder_streams_the_cpu_paths_pixels(
    name: str, request: pytest.FixtureRequest, built: dict[str, Path], decoder: batchdecode.BatchDecoder
) -> None:
    path = built[name] if name in built else request.getfixturevalue(name)
    mpp = 0.25 if name == "tcga_j2k_svs" else None
    ref, mode = _stream(path, mpp)
    assert mode.startswith("fast-"), mode
    got, _ = _stream(path, mpp, decoder=CPU_BACKEND)
    assert np.array_equal(got, ref), np.abs(got.astype(int) - ref).max()
    assert decoder.decoded > 0 and decoder.rejected == 0  # the batch decoder did the work, nothing fell back
    assert 1 <= decoder.decoders <= 2  # one a reader thread at most, reused from slide to slide


def test_33003_goes_to_the_batch_decoder_as_planes_and_stays_on_the_cpu_where_it_cannot_give_them(
    built: dict[str, Path], decoder: batchdecode.BatchDecoder
) -> None:
    """Aperio 33003 tiles are asked for as stored planes; nvImageCodec's CPU backend cannot decode subsampled
    J2K, so the layout fails its check, every tile takes the CPU path, and the result says why."""
    if "33003" not in built:
        pytest.skip("opj_compress (Debian libopenjp2-tools, in tests/sysdeps.sh) builds the 33003 slide")
    ref, mode = _stream(built["33003"], None)
    info: dict = {}
    got, _ = _stream(built["33003"], None, decoder=CPU_BACKEND, info=info)
    assert mode == "fast-tiff" and np.array_equal(got, ref)
    assert info["tiles_decoded"]["batch"] == 0 and info["tiles_decoded"]["cpu"] > 0
    (layout, verdict), *_ = info["batch_checks"].items()
    assert layout == "j2k 8b 1x1,2x1,2x1 mct0"  # luma full size, chroma halved across, no colour transform
    assert verdict["accepted"] is False and "it decoded 0 of" in verdict["reason"]


def test_33003_planes_convert_as_the_cpu_path_does(built: dict[str, Path]) -> None:
    """What a GPU (nvJPEG2000) hands back for 33003: [3, H, W], each chroma plane at its own size in the top-left
    corner; `from_planes` gives the CPU path's pixels from it (OpenSlide's tables), and refuses what does not
    fit."""
    from service.slides import openjpeg

    if "33003" not in built:
        pytest.skip("opj_compress (Debian libopenjp2-tools, in tests/sysdeps.sh) builds the 33003 slide")
    with tifffile.TiffFile(built["33003"]) as tif:
        w, h = tif.pages[0].imagewidth, tif.pages[0].imagelength
    level = open_tiff_level(built["33003"], w, h)
    try:
        for key in [(0, 0), (level.tiles_x - 1, level.tiles_y - 1)]:
            stream = level.stream(key)
            y, cb, cr = openjpeg.decode_components(stream, 0, expect_size=(level.tile_w, level.tile_h))
            assert cb.shape == (level.tile_h, level.tile_w // 2)
            planes = np.zeros((3, level.tile_h, level.tile_w), np.uint8)
            planes[0] = y
            planes[1, : cb.shape[0], : cb.shape[1]] = cb
            planes[2, : cr.shape[0], : cr.shape[1]] = cr
            assert np.array_equal(level.from_planes(planes, stream), level.decode_tile(key))
        assert level.from_planes(planes[:, :-1], stream) is None
        assert level.from_planes(planes, b"not a codestream") is None
    finally:
        level.close()


def test_a_layout_whose_pixels_differ_is_refused_for_the_process_and_read_on_the_cpu(
    cmu_svs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Aperio's RGB-coded tiles handed over without their Adobe segment: the decoder reads them as YCbCr (as
    nvJPEG would if it ignored the segment). The layout's first tiles are checked against the CPU path, the
    layout is refused, and the patches are the CPU path's; the next slide is not checked again."""
    from service.slides import fasttiles, stream

    fresh = batchdecode.BatchDecoder(CPU_BACKEND)  # its verdicts are its own, not the process decoder's
    monkeypatch.setattr(stream, "batch_decoder", lambda kind: fresh)
    real = fasttiles.TiffLevel.stream

    def unmarked(self, key):
        data = real(self, key)
        return None if data is None else data.replace(fasttiles._ADOBE_RGB, b"")

    monkeypatch.setattr(fasttiles.TiffLevel, "stream", unmarked)
    ref, _ = _stream(cmu_svs, None)
    info: dict = {}
    got, _ = _stream(cmu_svs, None, decoder=CPU_BACKEND, info=info)
    assert np.array_equal(got, ref)
    assert info["tiles_decoded"]["batch"] == 0
    verdict = info["batch_checks"]["jpeg sof0 1x1,1x1,1x1"]
    assert verdict["accepted"] is False and verdict["tiles"] == batchdecode.CHECK_TILES
    assert verdict["mean_diff"] > 10 * batchdecode.CHECK_MEAN_DIFF and "from the CPU path's" in verdict["reason"]
    decoded = fresh.decoded
    again: dict = {}
    assert np.array_equal(_stream(cmu_svs, None, decoder=CPU_BACKEND, info=again)[0], ref)
    assert fresh.decoded == decoded and again["batch_checks"] == info["batch_checks"]  # refused, not retried

    monkeypatch.setattr(fasttiles.TiffLevel, "stream", real)  # marked: its own layout, checked and accepted
    _stream(cmu_svs, None, decoder=CPU_BACKEND, info=again)
    verdict = again["batch_checks"]["jpeg sof0 1x1,1x1,1x1 adobe0"]
    assert verdict == {"accepted": True, "tiles": batchdecode.CHECK_TILES, "max_diff": 0, "mean_diff": 0.0}
    assert again["tiles_decoded"]["cpu"] == 0


def test_aperio_rgb_jpeg_needs_its_colour_space_marked(cmu_svs: Path, decoder: batchdecode.BatchDecoder) -> None:
    """Without the Adobe segment a decoder reads Aperio's RGB-coded tiles as YCbCr (off by up to 254 levels)."""
    level = open_tiff_level(cmu_svs, 2220, 2967)
    try:
        data = level._stored(level.tiles_x + 1)
        args = level._jpeg_args
        merged = complete_jpeg(data, level._jpegtables, {**args, "colorspace": None})
        marked = complete_jpeg(data, level._jpegtables, args)
        plain, ok = decoder.decode([merged, marked])
        ref = level.decode_tile((1, 1))
    finally:
        level.close()
    assert np.array_equal(ok, ref)
    assert np.abs(plain.astype(int) - ref).max() > 100


def test_damaged_tiles_fail_as_on_the_cpu_path_and_the_rest_still_read(
    tcga_j2k_svs: Path, ndpi: Path, tmp_path: Path, decoder: batchdecode.BatchDecoder
) -> None:
    """A J2K tile whose codestream body is garbage (its header is fine, so it goes to the batch decoder, which
    rejects it) and an NDPI restart interval overwritten with frame markers: the CPU path decodes them again
    and names the tile; no claim is left behind (another read of the same tiles fails again, never hangs)."""
    bad = tmp_path / "damaged.svs"
    shutil.copy(tcga_j2k_svs, bad)
    with tifffile.TiffFile(bad) as tif:
        page = tif.pages[0]
        w, h, tw = page.imagewidth, page.imagelength, page.tilewidth
        start, count = page.dataoffsets[1], page.databytecounts[1]
    with open(bad, "r+b") as fh:
        fh.seek(start + 200)
        fh.write(b"\xff\x90" * ((count - 220) // 2))
    src = FastTiffSource(open_tiff_level(bad, w, h), decoder=decoder)
    try:
        origins = np.array([[0, 0], [tw, 0]])
        for _ in range(2):
            with pytest.raises(CorruptSlideError, match=r"stored tile \(1, 0\).*cannot be decoded"):
                src.decode_ahead(origins, tw)
        assert src.read(0, 0, tw).shape == (tw, tw, 3)  # tile (0, 0) was decoded in the failed batch
        assert not src.cache._pending and decoder.rejected >= 1
    finally:
        src.close()

    bad = tmp_path / "damaged.ndpi"
    shutil.copy(ndpi, bad)
    with tifffile.TiffFile(bad) as tif:
        page = tif.pages[1]
        start = page.dataoffsets[len(page.dataoffsets) // 2]
    with open(bad, "r+b") as fh:
        fh.seek(start)
        fh.write(b"\xff\xc0\x00\x04" * 200)
    level = open_tiff_level(bad, 1984, 2432)
    src = FastTiffSource(level, decoder=decoder)
    try:
        origins = np.array([[0, ty * level.tile_h] for ty in range(level.tiles_y)])
        with pytest.raises(CorruptSlideError, match=r"NDPI block .* cannot be decoded"):
            src.decode_ahead(origins, level.tile_h)
        assert not src.cache._pending
        assert src.read(0, 0, (level.width, level.tile_h)).shape == (level.tile_h, level.width, 3)
    finally:
        src.close()


def test_a_gpu_decoder_where_none_can_run_is_a_clear_error(ndpi: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        batchdecode.BatchDecoder("nvimgcodec")
    except InvalidParameterError as exc:
        assert "cannot decode a JPEG on this machine" in str(exc) and "MSTAR_TILE_DECODER=cpu" in str(exc)
    else:
        pytest.skip("this machine has a GPU decoder")
    with pytest.raises(InvalidParameterError, match="tile_decoder must be one of"):
        batchdecode.BatchDecoder("nvjpeg")
    with open_slide(ndpi) as r, pytest.raises(InvalidParameterError, match="tile_decoder must be one of"):
        PatchReader(r, build_grid(r), fast=False, decoder="nvjpeg")  # refused even where no tile is decoded
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", None)  # not installed
    with pytest.raises(InvalidParameterError, match=r"pip install 'mstar\[gpu-decode\]'"):
        batchdecode.BatchDecoder(CPU_BACKEND)
    assert batchdecode.batch_decoder("cpu") is None


def test_the_pipeline_reads_through_the_configured_decoder(
    cmu_svs: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch, decoder
) -> None:
    from inference_fixtures import build_tiny_bundle

    from service.config import Settings
    from service.pipeline import AnalysisOptions, run_analysis
    from service.slides.h5io import read_h5

    tiny_bundle = build_tiny_bundle(tmp_path_factory.getbasetemp())  # the session's, built once
    opts = AnalysisOptions(tasks=("embedding",))
    cpu = run_analysis(cmu_svs, tmp_path / "cpu", opts, bundle_dir=tiny_bundle)["reading"]
    monkeypatch.setenv("MSTAR_TILE_DECODER", CPU_BACKEND)
    nv = run_analysis(cmu_svs, tmp_path / "nv", opts, bundle_dir=tiny_bundle)["reading"]
    assert decoder.decoded > 0
    # the result says how its patches were read: every stored tile by the CPU path, or by the batch decoder
    assert cpu["path"] == nv["path"] == "fast-tiff" and (cpu["tile_decoder"], nv["tile_decoder"]) == (
        "cpu",
        CPU_BACKEND,
    )
    assert cpu["tiles_decoded"]["batch"] == nv["tiles_decoded"]["cpu"] == 0
    assert cpu["tiles_decoded"]["cpu"] == nv["tiles_decoded"]["batch"] > 0
    np.testing.assert_array_equal(
        read_h5(tmp_path / "nv" / "features.h5")[1], read_h5(tmp_path / "cpu" / "features.h5")[1]
    )
    monkeypatch.setenv("MSTAR_TILE_DECODER", "nvjpeg")
    with pytest.raises(ValueError, match="tile_decoder"):
        Settings()
