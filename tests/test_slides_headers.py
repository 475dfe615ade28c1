"""Declared image sizes read from JPEG / JPEG 2000 header bytes (`service.slides.headers`), and the readers that
refuse a stored tile or frame whose header claims another size than its container gives it, before decoding:
one such header made the decoders allocate and fill 10-24 GB."""

from __future__ import annotations

import io
import resource
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from service.errors import CorruptSlideError
from service.slides.fasttiles import FastTiffSource, MiraxLevel, open_tiff_level
from service.slides.headers import (
    check_size,
    j2k_codestream_size,
    j2k_components,
    jpeg_frame_size,
    jpeg_scan_intact,
    stream_layout,
)
from service.slides.open import open_slide

HUGE = (60_000).to_bytes(2, "big")


def _jpeg(w: int, h: int, **options) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(buf, "JPEG", **options)
    return buf.getvalue()


def test_jpeg_frame_size_walks_the_markers() -> None:
    assert jpeg_frame_size(_jpeg(120, 200)) == (120, 200)
    assert jpeg_frame_size(_jpeg(64, 48, progressive=True)) == (64, 48)  # SOF2
    exif = _jpeg(33, 17, exif=b"Exif\x00\x00" + b"\x00" * 300)  # an APP1 segment before the frame
    assert jpeg_frame_size(exif) == (33, 17)
    for bad in (b"", b"\x00\x00\x00\x00", b"\xff\xd8\xff\xda\x00\x02", b"\xff\xd8\x12\x34\x00\x02"):
        with pytest.raises(ValueError):
            jpeg_frame_size(bad)
    with pytest.raises(ValueError, match="ends before"):
        jpeg_frame_size(_jpeg(8, 8)[:20])


def test_jpeg_scan_intact_finds_markers_that_do_not_belong_in_a_scan() -> None:
    """A JPEG with restart markers (random pixels: stuffed 0xFF00 bytes occur all over its scan) passes;
    the ways a stream breaks without libjpeg-turbo's decoder failing outright do not."""
    import cv2

    rng = np.random.default_rng(3)
    ok, buf = cv2.imencode(".jpg", rng.integers(0, 255, (64, 96, 3), np.uint8), [cv2.IMWRITE_JPEG_RST_INTERVAL, 6])
    good = buf.tobytes()
    scan = good.index(b"\xff\xda")
    rst = [i for i in range(scan, len(good) - 1) if good[i] == 0xFF and 0xD0 <= good[i + 1] <= 0xD7]
    assert ok and len(rst) == 3 and b"\xff\x00" in good[scan:]  # 24 MCUs, 6 an interval; stuffed bytes
    assert jpeg_scan_intact(good)
    assert not jpeg_scan_intact(good[:-2])  # cut short: no EOI
    assert not jpeg_scan_intact(good[: len(good) // 2] + b"\xff\xd9")  # cut short, EOI appended
    spliced = bytearray(good)
    spliced[rst[1] + 1] = 0xD5  # a restart marker out of turn (an interval missing or from elsewhere)
    assert not jpeg_scan_intact(bytes(spliced))
    over = bytearray(good)
    over[rst[2] + 40 : rst[2] + 44] = b"\xff\xc0\x00\x04"  # a frame marker written over scan data
    assert not jpeg_scan_intact(bytes(over))
    assert not jpeg_scan_intact(good[:200])  # the header alone


def test_j2k_codestream_size_reads_the_siz_segment() -> None:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((200, 120, 3), np.uint8)).save(buf, "JPEG2000", no_jp2=True)
    stream = buf.getvalue()
    assert j2k_codestream_size(stream) == (120, 200)
    with pytest.raises(ValueError, match="not a JPEG 2000 codestream"):
        j2k_codestream_size(stream[4:])
    empty = bytearray(stream)
    empty[8:12] = (0).to_bytes(4, "big")
    with pytest.raises(ValueError, match="empty image"):
        j2k_codestream_size(bytes(empty))
    with pytest.raises(ValueError, match="says 60000x60000 px, not the 256x256"):
        check_size((60_000, 60_000), (256, 256), "tile")


def test_stream_layout_names_what_a_decoder_could_get_wrong(cmu_svs: Path) -> None:
    """Sampling, colour transform and frame type for JPEG; depth, subsampling and the component transform for
    J2K: each layout a batch decoder is checked on separately."""
    import cv2

    px = np.random.default_rng(0).integers(0, 255, (32, 48, 3), np.uint8)
    assert stream_layout(_jpeg(48, 32)) == "jpeg sof0 2x2,1x1,1x1"  # Pillow's default 4:2:0
    assert stream_layout(_jpeg(48, 32, subsampling=0)) == "jpeg sof0 1x1,1x1,1x1"
    assert stream_layout(_jpeg(48, 32, progressive=True)) == "jpeg sof2 2x2,1x1,1x1"
    grey = cv2.imencode(".jpg", px[..., 0])[1].tobytes()
    assert stream_layout(grey) == "jpeg sof0 1x1"
    level = open_tiff_level(cmu_svs, 2220, 2967)
    try:  # Aperio's RGB-coded tiles carry the Adobe segment the fast path adds (transform 0: R, G, B)
        assert stream_layout(level.stream((1, 1))) == "jpeg sof0 1x1,1x1,1x1 adobe0"
    finally:
        level.close()
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, "JPEG2000", no_jp2=True, mct=1)  # RGB with the component transform
    assert stream_layout(buf.getvalue()) == "j2k 8b 1x1,1x1,1x1 mct1"
    assert j2k_components(buf.getvalue()) == [(8, 1, 1)] * 3
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, "JPEG2000", no_jp2=True, mct=0)
    assert stream_layout(buf.getvalue()) == "j2k 8b 1x1,1x1,1x1 mct0"
    buf = io.BytesIO()
    Image.fromarray(px[..., 0]).save(buf, "JPEG2000", no_jp2=True)
    assert stream_layout(buf.getvalue()) == "j2k 8b 1x1 mct0"
    for bad in (b"", b"GIF89a" + bytes(40), _jpeg(8, 8)[:20], buf.getvalue()[:44]):
        with pytest.raises(ValueError):
            stream_layout(bad)


def _peak_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def test_jpeg_tile_claiming_a_huge_image_is_refused(cmu_svs: Path, tmp_path: Path) -> None:
    """A JPEG SVS tile whose frame header claims 60,000 x 60,000 px: the fast path took 10 GB and 15 s decoding
    it; now a corrupt_slide error from the header, and the slide's other tiles still read."""
    bad = tmp_path / "bomb.svs"
    shutil.copy(cmu_svs, bad)
    with tifffile.TiffFile(bad) as tif:
        page = tif.pages[0]
        start, count, w, h = page.dataoffsets[0], page.databytecounts[0], page.imagewidth, page.imagelength
    with open(bad, "r+b") as fh:
        fh.seek(start)
        sof = fh.read(count).index(b"\xff\xc0")
        fh.seek(start + sof + 5)
        fh.write(HUGE * 2)
    before = _peak_kb()
    src = FastTiffSource(open_tiff_level(bad, w, h))
    try:
        with pytest.raises(CorruptSlideError, match=r"tile \(0, 0\).*60000x60000 px, not the 240x240"):
            src.read(0, 0, 224)
        assert src.read(480, 480, 224).shape == (224, 224, 3)
    finally:
        src.close()
    assert _peak_kb() - before < 200_000  # KB: no gigabytes taken


def test_mirax_image_claiming_a_huge_image_is_refused(cmu_svs: Path, tmp_path: Path) -> None:
    from slide_fixtures import write_mirax

    bad = write_mirax(cmu_svs, tmp_path / "bomb.mrxs")
    with open_slide(bad) as r:
        w, h = (int(v) for v in r.level_dimensions[0])
    level = open_tiff_level(bad, w, h)
    assert isinstance(level, MiraxLevel)
    fileno, offset, length = level.images[(0, 0)]
    level.close()
    with open(sorted(bad.with_suffix("").glob("Data*.dat"))[fileno], "r+b") as fh:
        fh.seek(offset)
        sof = fh.read(length).index(b"\xff\xc0")
        fh.seek(offset + sof + 5)
        fh.write(HUGE * 2)
    level = open_tiff_level(bad, w, h)
    try:
        with pytest.raises(CorruptSlideError, match=r"MIRAX image \(0, 0\).*60000x60000"):
            level.decode_tile((0, 0))
        assert level.decode_tile((1, 0)).shape == (level.tile_h, level.tile_w, 3)
    finally:
        level.close()


@pytest.mark.parametrize("label", ["RGB", "YBR_FULL_422"])
def test_dicom_frame_claiming_a_huge_image_is_refused(dicom_dir: Path, tmp_path: Path, label: str) -> None:
    """A DICOM frame whose JPEG header claims 60,000 x 60,000 px is a corrupt_slide error naming the frame, both
    where the reader decodes the sample's mislabelled YCbCr frames itself ("RGB", as stored) and where wsidicom
    decodes them (the label set right: wsidicom's decoder asked for 10 GB on such a frame)."""
    import pydicom

    bad = tmp_path / "dicom"
    shutil.copytree(dicom_dir, bad)
    for f in bad.glob("*.dcm"):
        ds = pydicom.dcmread(f)
        if getattr(ds, "PhotometricInterpretation", None) == "RGB" and label != "RGB":
            ds.PhotometricInterpretation = label
            ds.save_as(f)
    level0 = max(bad.glob("*.dcm"), key=lambda p: p.stat().st_size)  # the largest file: level 0's frames
    raw = bytearray(level0.read_bytes())
    sof = raw.index(b"\xff\xc0", raw.index(b"\xff\xd8\xff"))  # in the first encapsulated frame
    raw[sof + 5 : sof + 9] = HUGE * 2
    level0.write_bytes(bytes(raw))
    before = _peak_kb()
    with open_slide(bad) as r:
        assert (r._corrections[0] is None) == (label != "RGB")  # which decoder the frame goes to
        with pytest.raises(CorruptSlideError, match=r"frame \(0, 0\) of level 0.*60000x60000"):
            r.read_region((0, 0), 0, (64, 64))
        assert r.read_region((600, 600), 0, (64, 64)).shape == (64, 64, 3)
    assert _peak_kb() - before < 200_000


def test_tifffile_reader_refuses_an_oversized_tile_header(cmu_svs: Path, tmp_path: Path) -> None:
    """The tifffile reader (OME-TIFF, SubIFD pyramids) decodes through tifffile, which checks a tile's size only
    after decoding it; a JPEG tile claiming 60,000 x 60,000 px is refused from its header first."""
    from service.slides.readers.tiff_reader import TiffReader

    path = tmp_path / "bomb.tif"
    with open_slide(cmu_svs) as r:
        rgb = np.ascontiguousarray(r.read_region((0, 0), 0, (512, 512)))
    tifffile.imwrite(path, rgb, tile=(256, 256), compression="jpeg", photometric="rgb")
    with tifffile.TiffFile(path) as tif:
        start, count = tif.pages[0].dataoffsets[0], tif.pages[0].databytecounts[0]
    with open(path, "r+b") as fh:
        fh.seek(start)
        sof = fh.read(count).index(b"\xff\xc0")
        fh.seek(start + sof + 5)
        fh.write(HUGE * 2)
    reader = TiffReader(path)
    before = _peak_kb()
    try:
        with pytest.raises(CorruptSlideError, match=r"tile 0 cannot be decoded.*60000x60000 px, the file 256x256"):
            reader.read_region((0, 0), 0, (64, 64))
        assert reader.read_region((300, 300), 0, (64, 64)).shape == (64, 64, 3)
    finally:
        reader.close()
    assert _peak_kb() - before < 200_000
