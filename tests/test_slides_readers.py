"""Readers on the real slides in ../shared/data: geometry, µm/px and its source, pixels, and every refusal."""

from __future__ import annotations

import io
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from slide_fixtures import write_dicom_variant, write_sparse_dicom

from service.errors import (
    CorruptSlideError,
    InvalidParameterError,
    MissingMppError,
    MstarError,
    SlideError,
    SlideNotFoundError,
    SlideTooLargeError,
    UnsupportedFormatError,
)
from service.slides import mpp as mppmod
from service.slides.base import Mpp
from service.slides.open import open_slide, require_mpp
from service.slides.readers._common import to_rgb
from service.slides.readers.dicom_reader import jpeg_stream_colour
from service.slides.sniff import sniff_format

# (fixture, format, vendor, level-0 (w, h), level count, µm/px or None, µm/px source)
REAL = [
    ("cmu_svs", "svs", "aperio", (2220, 2967), 1, 0.499, "aperio"),
    ("tcga_j2k_svs", "svs", "aperio", (4443, 3567), 2, None, None),
    ("ndpi", "ndpi", "hamamatsu", (3968, 4864), 7, 0.22818, "tiff-resolution"),
    ("dicom_dir", "dicom-dir", "dicom", (2220, 2967), 3, 0.499, "dicom-pixel-spacing"),
]


@pytest.mark.parametrize(("fix", "fmt", "vendor", "dims", "nlev", "mpp", "source"), REAL)
def test_real_slide_geometry_and_mpp(request, fix, fmt, vendor, dims, nlev, mpp, source):
    path = request.getfixturevalue(fix)
    assert sniff_format(path) == fmt
    with open_slide(path) as r:
        assert r.format == fmt and r.vendor == vendor
        assert r.dimensions == dims and r.level_count == nlev
        assert r.level_downsamples[0] == 1.0
        assert all(b > a for a, b in zip(r.level_downsamples, r.level_downsamples[1:], strict=False))
        if mpp is None:
            assert r.mpp is None
            with pytest.raises(MissingMppError, match=r"--mpp-override") as err:
                require_mpp(r)
            assert path.name in str(err.value)
        else:
            assert r.mpp.source == source
            assert r.mpp.x == pytest.approx(mpp, rel=1e-3) and r.mpp.y == pytest.approx(mpp, rel=1e-3)
            assert require_mpp(r) is r.mpp
        d = r.describe()
        assert d["level_dimensions"][0] == list(dims) and "label" not in d["associated_images"]


@pytest.mark.parametrize(("fix", "fmt", "vendor", "dims", "nlev", "mpp", "source"), REAL)
def test_real_slide_read_region(request, fix, fmt, vendor, dims, nlev, mpp, source):
    path = request.getfixturevalue(fix)
    with open_slide(path) as r:
        w, h = r.dimensions
        for level in (0, r.level_count - 1):
            a = r.read_region((w // 3, h // 3), level, (173, 91))
            assert a.shape == (91, 173, 3) and a.dtype == np.uint8 and a.flags.c_contiguous
        # Entirely outside -> white; straddling the bottom-right corner -> white only outside.
        assert (r.read_region((w + 10, h + 10), 0, (64, 64)) == 255).all()
        assert (r.read_region((-500, -500), 0, (100, 100)) == 255).all()
        edge = r.read_region((w - 50, h - 50), 0, (100, 100))
        assert (edge[50:, :] == 255).all() and (edge[:, 50:] == 255).all()
        thumb = r.thumbnail(300)
        assert max(thumb.shape[:2]) == 300 and thumb.dtype == np.uint8
        assert abs(thumb.shape[1] / thumb.shape[0] - w / h) < 0.02


def test_fluorescence_background_is_black_inside_white_outside(ndpi):
    with open_slide(ndpi) as r:
        a = r.read_region((0, 0), 2, (300, 300))
        assert a.mean() < 60  # DAPI on black
        assert (r.read_region((r.dimensions[0], 0), 0, (10, 10)) == 255).all()


def test_override_replaces_and_is_validated(tcga_j2k_svs, cmu_svs):
    with open_slide(tcga_j2k_svs, mpp_override=0.25) as r:
        assert r.mpp == Mpp(0.25, 0.25, "override") and require_mpp(r).mean == 0.25
        assert r.read_region((1000, 1000), 0, (64, 64)).std() > 0  # JPEG 2000 tiles decode
    with open_slide(cmu_svs, mpp_override=0.5) as r:
        assert r.mpp.source == "override"
    for bad in (0.0, 72.0, -1, float("nan"), "abc"):
        with pytest.raises(InvalidParameterError):
            open_slide(cmu_svs, mpp_override=bad)


def test_associated_images_phi_guard(cmu_svs, ndpi):
    with open_slide(cmu_svs) as r:
        assert set(r.associated_names) == {"label", "macro", "thumbnail"}
        assert r.read_associated("thumbnail").shape[2] == 3
        for name in ("label", "macro"):
            with pytest.raises(SlideError, match="patient identity"):
                r.read_associated(name)
        assert r.read_associated("label", allow_phi=True).shape == (463, 387, 3)
        with pytest.raises(SlideError, match="not available"):
            r.read_associated("nonexistent")
    with open_slide(ndpi) as r, pytest.raises(SlideError):
        r.read_associated("macro")


def test_bad_region_arguments(cmu_svs):
    with open_slide(cmu_svs) as r:
        with pytest.raises(InvalidParameterError):
            r.read_region((0, 0), 5, (10, 10))
        with pytest.raises(InvalidParameterError):
            r.read_region((0, 0), 0, (0, 10))
        with pytest.raises(SlideTooLargeError):
            r.read_region((0, 0), 0, (100_000, 100_000))


# ---- format sniffing: bytes, not names -------------------------------------------------------------


def test_sniff_uses_bytes_not_names(tmp_path, cmu_svs, shared_data, bad_dicom, dicom_dir):
    disguised = tmp_path / "slide.png"
    shutil.copy(cmu_svs, disguised)
    assert sniff_format(disguised) == "svs"
    png_as_svs = tmp_path / "tile.svs"
    shutil.copy(shared_data / "tiles" / "TCGA-HE-7130-01Z-00-DX1.png", png_as_svs)
    assert sniff_format(png_as_svs) == "png"
    assert sniff_format(shared_data / "tiles" / "kather1.tif") == "tiff"
    assert sniff_format(bad_dicom) == "dicom"
    assert sniff_format(next(dicom_dir.glob("*.dcm"))) == "dicom"
    jpg = tmp_path / "x.bin"
    Image.new("RGB", (8, 8), (200, 100, 50)).save(jpg, format="JPEG")
    assert sniff_format(jpg) == "jpeg"
    mrxs = tmp_path / "a.dat"
    mrxs.write_text("[GENERAL]\nSLIDE_VERSION = 01.02\n")
    assert sniff_format(mrxs) == "mrxs"


@pytest.mark.parametrize(
    ("content", "error", "match"),
    [
        (b"", CorruptSlideError, "empty"),
        (b"hello, not a slide at all" * 10, UnsupportedFormatError, "not a recognised"),
        (b"PK\x03\x04" + bytes(100), UnsupportedFormatError, "ZIP"),
        (b"ZISRAWFILE" + bytes(100), UnsupportedFormatError, "CZI"),
        (b"II*\x00" + bytes(100), CorruptSlideError, "truncated or damaged"),
    ],
)
def test_unknown_and_broken_files_refused(tmp_path, content, error, match):
    p = tmp_path / "upload.svs"
    p.write_bytes(content)
    with pytest.raises(error, match=match) as err:
        open_slide(p)
    assert "upload.svs" in str(err.value)


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(SlideNotFoundError):
        open_slide(tmp_path / "nope.svs")
    with pytest.raises(UnsupportedFormatError, match="no DICOM"):
        open_slide(tmp_path)


def test_mrxs_without_data_folder_refused_cleanly(tmp_path):
    p = tmp_path / "slide.mrxs"
    p.write_text("[GENERAL]\nSLIDE_VERSION = 01.02\n")
    with pytest.raises(SlideError):
        open_slide(p)


# ---- corrupt, truncated, bombs ---------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.01, 0.5, 0.9, 0.999])
def test_truncated_svs_refused(tmp_path, cmu_svs, fraction):
    data = cmu_svs.read_bytes()
    p = tmp_path / "truncated.svs"
    p.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(CorruptSlideError, match=r"truncated|damaged|incomplete"), open_slide(p) as r:
        r.read_region((0, 0), 0, r.dimensions)


def test_damaged_tile_data_refused_on_read(tmp_path, cmu_svs):
    b = bytearray(cmu_svs.read_bytes())
    b[200_000:600_000] = bytes(400_000)  # zero out tile bytes in the middle of level 0
    p = tmp_path / "zeroed.svs"
    p.write_bytes(bytes(b))
    with open_slide(p) as r, pytest.raises(CorruptSlideError, match="cannot be decoded"):
        r.read_region((0, 0), 0, r.dimensions)


def _tiff_declaring(tmp_path: Path, width: int, height: int) -> Path:
    """A real 256x256 tiled TIFF whose header is then rewritten to claim `width`x`height`."""
    p = tmp_path / "bomb.tif"
    tifffile.imwrite(p, np.zeros((256, 256, 3), np.uint8), tile=(256, 256), photometric="rgb", compression="zlib")
    with tifffile.TiffFile(p, mode="r+b") as tif:
        tif.pages[0].tags["ImageWidth"].overwrite(width)
        tif.pages[0].tags["ImageLength"].overwrite(height)
    return p


def test_decompression_bomb_refused_before_decoding(tmp_path, cmu_svs):
    with pytest.raises(SlideTooLargeError, match="300000x300000"):
        open_slide(_tiff_declaring(tmp_path, 300_000, 300_000))
    with pytest.raises(SlideTooLargeError, match="limit of 1000"):
        open_slide(cmu_svs, max_side=1000)


def test_implausible_tile_count_refused(tmp_path):
    # 4096x4096 in 256 px tiles needs 256 tiles; the file lists one.
    with pytest.raises(CorruptSlideError, match="lists 1 tiles"):
        open_slide(_tiff_declaring(tmp_path, 4096, 4096))


def test_nonconformant_dicom_refused(bad_dicom, tmp_path):
    with pytest.raises(UnsupportedFormatError, match="not a readable whole-slide image") as err:
        open_slide(bad_dicom)
    assert bad_dicom.name in str(err.value) and err.value.http_status == 415
    d = tmp_path / "series"
    d.mkdir()
    shutil.copy(bad_dicom, d / "x.dcm")
    with pytest.raises(UnsupportedFormatError):
        open_slide(d)


# ---- plain image tiles -----------------------------------------------------------------------------


def test_plain_tiles_need_explicit_mpp(shared_data):
    kather = shared_data / "tiles" / "kather1.tif"
    with pytest.raises(MissingMppError, match="--mpp-override"):
        open_slide(kather)  # its tag says 72 dpi: not a microscope scale
    with open_slide(kather, mpp_override=0.5) as r:
        assert r.dimensions == (224, 224) and r.mpp == Mpp(0.5, 0.5, "override")
        a = r.read_region((200, 200), 0, (50, 50))
        assert a.shape == (50, 50, 3) and (a[24:, :] == 255).all() and a[:24, :24].std() > 0
    rgba = shared_data / "tiles" / "histolab-tissue-level0-4302-10273-4814-10785.png"
    with open_slide(rgba, mpp_override=0.25) as r:
        assert r.read_region((0, 0), 0, (512, 512)).shape == (512, 512, 3)


def test_transparent_png_composited_on_white(tmp_path):
    arr = np.zeros((20, 20, 4), np.uint8)
    arr[..., 0] = 200
    arr[:10, :, 3] = 255  # top half opaque red-ish, bottom fully transparent
    p = tmp_path / "t.png"
    Image.fromarray(arr, "RGBA").save(p)
    with open_slide(p, mpp_override=0.5) as r:
        a = r.read_region((0, 0), 0, (20, 20))
    assert (a[:10] == [200, 0, 0]).all() and (a[10:] == 255).all()


# ---- µm/px parsing -----------------------------------------------------------------------------------


def test_mpp_parsers():
    assert mppmod.from_tiff_resolution(72, 72, 2) is None  # 72 dpi = 352 µm/px: implausible
    m = mppmod.from_tiff_resolution(20040.08, 20040.08, 3)
    assert m.source == "tiff-resolution" and m.x == pytest.approx(0.499, rel=1e-4)
    assert mppmod.from_tiff_resolution(50800, 50800, "inch").x == pytest.approx(0.5)
    assert mppmod.from_tiff_resolution(1000, 1000, 1) is None  # no absolute unit
    xml = (
        '<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"><Image ID="Image:0">'
        '<Pixels PhysicalSizeX="250" PhysicalSizeXUnit="nm" '
        'PhysicalSizeY="0.00025" PhysicalSizeYUnit="mm"/>'
        "</Image></OME>"
    )
    m = mppmod.from_ome_xml(xml)
    assert (m.x, m.y, m.source) == (pytest.approx(0.25), pytest.approx(0.25), "ome")
    assert mppmod.from_ome_xml("<not xml") is None
    m = mppmod.from_pixel_spacing((0.000498, 0.000499))  # (row = y, column = x), mm
    assert (m.x, m.y) == (pytest.approx(0.499), pytest.approx(0.498))
    assert mppmod.from_pixel_spacing((0.5, 0.5)) is None  # 500 µm/px
    assert mppmod.from_openslide_properties({"aperio.MPP": "0.2520"}).source == "aperio"
    assert mppmod.from_openslide_properties({"aperio.MPP": "0"}) is None


# ---- DICOM colour mislabel ------------------------------------------------------------------------


def _regions():
    return [(0, 0), (700, 900), (1500, 2000), (200, 1200), (1200, 300)]


def test_dicom_jfif_frames_labelled_rgb_are_detected(dicom_dir):
    with open_slide(dicom_dir) as r:
        assert r.photometric == "RGB"
        assert r.colour_correction == "jfif-ycbcr-labelled-rgb"
        frame = r._wsi.read_encoded_tile(0, (0, 0), crop_to_image_boundary=False)
    assert jpeg_stream_colour(frame) == "ycbcr"
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(buf, format="JPEG")
    assert jpeg_stream_colour(buf.getvalue()) == "ycbcr"  # Pillow writes JFIF
    assert jpeg_stream_colour(b"not a jpeg") is None


# Same region of CMU-1-Small-Region as SVS (Aperio JPEG Q30) and as DICOM (re-encoded by wsi2dcm): the
# measured mean |Δ| is 1-7.5 per 400x400 region (JPEG re-encoding noise in dense tissue) and ~4 on average;
# trusting the RGB label (what wsidicom/OpenSlide do) gives 55-80.
DICOM_MAX_REGION_DIFF = 9.0
DICOM_MAX_MEAN_DIFF = 6.0


@pytest.mark.parametrize("which", ["folder", "level-0 file", "level-2 file"])
def test_dicom_pixels_match_svs(dicom_dir, cmu_svs, which):
    src = {
        "folder": dicom_dir,
        "level-0 file": dicom_dir / "level-0-frames-0-30.dcm",
        "level-2 file": dicom_dir / "level-2-frames-0-4.dcm",
    }[which]
    with open_slide(cmu_svs) as svs, open_slide(src) as dcm:
        assert dcm.level_count == 3 and dcm.mpp.source == "dicom-pixel-spacing"
        diffs = [
            np.abs(
                dcm.read_region(loc, 0, (400, 400)).astype(int) - svs.read_region(loc, 0, (400, 400)).astype(int)
            ).mean()
            for loc in _regions()
        ]
    assert max(diffs) < DICOM_MAX_REGION_DIFF and np.mean(diffs) < DICOM_MAX_MEAN_DIFF, diffs


def test_trusting_the_label_would_fail_this_check(dicom_dir, cmu_svs):
    """The control: wsidicom's own decode (label trusted) is far off, so the parity check above can fail."""
    from wsidicom import WsiDicom

    with open_slide(cmu_svs) as svs, WsiDicom.open(dicom_dir) as w:
        diffs = [
            np.abs(
                np.asarray(w.read_region(loc, 0, (400, 400))).astype(int)[..., :3]
                - svs.read_region(loc, 0, (400, 400)).astype(int)
            ).mean()
            for loc in _regions()
        ]
    assert min(diffs) > 5 * DICOM_MAX_MEAN_DIFF


def _levels(reader) -> list[np.ndarray]:
    return [reader.read_region((0, 0), lv, reader.level_dimensions[lv]) for lv in range(reader.level_count)]


def test_dicom_colour_is_judged_on_a_stored_frame(dicom_dir, tmp_path):
    """A TILED_SPARSE level storing no frame at its top-left corner (a sparse series stores none over background)
    is still found mislabelled: the check used to read tile (0, 0), got wsidicom's blank tile and decoded the
    whole level as RGB (pink, 65 levels off)."""
    sparse = write_sparse_dicom(dicom_dir, tmp_path / "sparse", drop={0})  # frame (0, 0): x, y < 500
    with open_slide(dicom_dir) as ref, open_slide(sparse) as r:
        assert r._corrections == ref._corrections == ["jfif-ycbcr-labelled-rgb"] * 3
        full = ref.read_region((0, 0), 0, ref.level_dimensions[0])
        got = r.read_region((0, 0), 0, r.level_dimensions[0])
    assert (got[:500, :500] == 255).all()
    assert np.array_equal(got[500:], full[500:]) and np.array_equal(got[:, 500:], full[:, 500:])


def test_dicom_colour_is_judged_per_level(dicom_dir, tmp_path):
    """Level 0 labelled right (YBR_FULL_422) while the coarser levels keep the sample's mislabel: each level is
    judged by its own label. Level 0's label was used for every level, so the coarse levels, and the tissue mask
    made from them, came out pink."""

    def relabel(ds, level, frames):
        if level == 0:
            ds.PhotometricInterpretation = "YBR_FULL_422"

    with open_slide(dicom_dir) as ref, open_slide(write_dicom_variant(dicom_dir, tmp_path / "v", relabel)) as r:
        assert r.photometrics == ["YBR_FULL_422", "RGB", "RGB"]
        assert r._corrections == [None, "jfif-ycbcr-labelled-rgb", "jfif-ycbcr-labelled-rgb"]
        assert all(np.array_equal(a, b) for a, b in zip(_levels(r), _levels(ref), strict=True))


def test_dicom_frame_cut_short_is_refused_not_read_grey(dicom_dir, tmp_path):
    """A JPEG frame cut to a third: libjpeg decodes it to grey from where the data stops, without an error (the
    control below), so a damaged series was analysed with grey patches. It is refused, on the read and on the
    streaming path; the frames around it still read. (Frame items padded with a NUL to an even length pass.)"""
    import imagecodecs
    from pydicom.encaps import encapsulate

    from service.slides.grid import build_grid
    from service.slides.stream import iter_batches

    cut: list[bytes] = []

    def truncate(ds, level, frames):
        if level == 0:
            cut.append(frames[7][: len(frames[7]) // 3])  # frame (2, 1)
            ds.PixelData = encapsulate([*frames[:7], cut[0], *frames[8:]])

    damaged = write_dicom_variant(dicom_dir, tmp_path / "v", truncate)
    assert imagecodecs.jpeg8_decode(cut[0]).shape == (500, 500, 3)  # the decoder alone does not notice
    with open_slide(dicom_dir) as ref, open_slide(damaged) as r:
        assert np.array_equal(r.read_region((500, 500), 0, (500, 500)), ref.read_region((500, 500), 0, (500, 500)))
        with pytest.raises(CorruptSlideError, match=r"frame \(2, 1\) of level 0 is cut short"):
            r.read_region((1000, 500), 0, (500, 500))
        with pytest.raises(CorruptSlideError, match="cut short"):
            for _ in iter_batches(r, build_grid(r, target_mpp=0.5)):
                pass


@pytest.mark.parametrize("how", ["missing", "zero", "per frame only"])
def test_dicom_without_pixel_spacing_is_refused_as_missing_mpp(dicom_dir, tmp_path, how):
    """No usable PixelSpacing: wsidicom cannot build the pyramid (it matches levels by spacing) and raised an
    error without a message (`unsupported_format`, "wsidicom said: "). Now `missing_mpp` saying why, and that an
    override cannot stand in (it is refused with one too)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    def edit(ds, level, frames):
        shared = ds.SharedFunctionalGroupsSequence[0]
        if how == "zero":
            shared.PixelMeasuresSequence[0].PixelSpacing = [0, 0]
            return
        if how == "per frame only":
            items = []
            for _ in frames:
                item = Dataset()
                item.PixelMeasuresSequence = shared.PixelMeasuresSequence
                items.append(item)
            ds.PerFrameFunctionalGroupsSequence = Sequence(items)
        del ds.SharedFunctionalGroupsSequence

    folder = write_dicom_variant(dicom_dir, tmp_path / "v", edit)
    for override in (None, 0.5):
        with pytest.raises(MissingMppError, match=r"declare no usable PixelSpacing.*override cannot stand in"):
            open_slide(folder, mpp_override=override)


def test_concurrent_reads_match_serial(dicom_dir):
    with open_slide(dicom_dir) as r:
        locs = [(x, y) for x in range(0, 2200, 450) for y in range(0, 2900, 700)]
        serial = [r.read_region(loc, 0, (300, 300)) for loc in locs]
        results: dict[int, np.ndarray] = {}

        def work(i: int) -> None:
            results[i] = r.read_region(locs[i], 0, (300, 300))

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(locs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert all(np.array_equal(serial[i], results[i]) for i in range(len(locs)))


def test_errors_are_mstar_errors():
    for cls in (UnsupportedFormatError, CorruptSlideError, MissingMppError, SlideTooLargeError, SlideNotFoundError):
        assert issubclass(cls, MstarError) and cls.code != "error"


def _write_dicom(path: Path, sop_class: str, **attrs) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_non_wsi_dicom_refused_with_its_kind(tmp_path):
    ct = _write_dicom(tmp_path / "ct.dcm", "1.2.840.10008.5.1.4.1.1.2", Rows=4, Columns=4)
    assert sniff_format(ct) == "dicom"
    with pytest.raises(UnsupportedFormatError, match="CT Image Storage"):
        open_slide(ct)


def test_dicom_header_bomb_refused(tmp_path):
    wsi = "1.2.840.10008.5.1.4.1.1.77.1.6"
    big = _write_dicom(
        tmp_path / "big.dcm",
        wsi,
        Rows=512,
        Columns=512,
        TotalPixelMatrixRows=900_000,
        TotalPixelMatrixColumns=400_000,
        NumberOfFrames=1,
    )
    with pytest.raises(SlideTooLargeError, match="400000x900000"):
        open_slide(big)
    many = _write_dicom(
        tmp_path / "many.dcm",
        wsi,
        Rows=512,
        Columns=512,
        TotalPixelMatrixRows=1024,
        TotalPixelMatrixColumns=1024,
        NumberOfFrames=10_000,
    )
    with pytest.raises(CorruptSlideError, match="10000 frames"):
        open_slide(many)


def test_dicom_folder_ignores_non_wsi_objects(tmp_path, dicom_dir):
    d = tmp_path / "series"
    shutil.copytree(dicom_dir, d)
    _write_dicom(d / "zz-annotation.dcm", "1.2.840.10008.5.1.4.1.1.91.1")  # bulk annotations
    with open_slide(d) as r:
        assert r.dimensions == (2220, 2967) and r.level_count == 3


def test_to_rgb_drops_opaque_alpha_and_composites_the_rest_onto_white() -> None:
    """OpenSlide's RGBA: opaque pixels keep their colour, transparent ones (outside the slide) turn white and
    partly transparent ones are blended onto white with rounding; views and empty regions work too."""
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (37, 53, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    assert np.array_equal(to_rgb(rgba), rgba[..., :3])
    assert np.array_equal(to_rgb(rgba[5:20, 7:40]), rgba[5:20, 7:40, :3])  # a non-contiguous view
    rgba[:10, :, 3] = 0
    rgba[10:20, :, 3] = rng.integers(1, 255, (10, 53), dtype=np.uint8)
    rgba[30:33, 40:45, 3] = 100  # a second patch of transparency: opaque pixels between them keep their colour
    a = rgba[..., 3:].astype(float) / 255
    expected = np.floor(rgba[..., :3] * a + 255 * (1 - a) + 0.5).astype(np.uint8)
    out = to_rgb(rgba)
    assert out.dtype == np.uint8 and out.flags.c_contiguous and out.shape == (37, 53, 3)
    assert (out[:10] == 255).all() and np.array_equal(out, expected)
    assert np.array_equal(out[20:30], rgba[20:30, :, :3]) and np.array_equal(out[33:], rgba[33:, :, :3])
    assert to_rgb(np.zeros((0, 4, 4), np.uint8)).shape == (0, 4, 3)


def test_to_rgb_scales_16_bit_samples_by_their_range_not_the_tile() -> None:
    """16-bit samples become 8-bit by the type's range (libtiff's, so OpenSlide's): a stored 100 is 0 in every
    tile. It was scaled by each tile's own maximum only where that exceeded 255, so the same stored value read
    100 in an all-background tile and 0 in a tile that also held tissue."""
    background = np.full((8, 8, 3), 100, np.uint16)
    tissue = background.copy()
    tissue[:4] = 60000
    assert (to_rgb(background) == 0).all() and (to_rgb(tissue)[4:] == 0).all()
    assert (to_rgb(tissue)[:4] == round(60000 * 255 / 65535)).all()
    assert to_rgb(np.array([[0, 257, 65535]], np.uint16)).tolist() == [[[0] * 3, [1] * 3, [255] * 3]]


def test_a_pipe_named_like_a_slide_is_refused_not_waited_on(tmp_path) -> None:
    """A FIFO called `slide.svs` blocked the format sniffing forever (open waits for a writer)."""
    import os

    fifo = tmp_path / "slide.svs"
    os.mkfifo(fifo)
    with pytest.raises(UnsupportedFormatError, match="not a regular file"):
        sniff_format(fifo)


def test_a_one_strip_tiff_larger_than_the_cache_is_decoded_once(tmp_path) -> None:
    """A 5,000 x 5,000 TIFF stored as one strip (75 MB decoded, over the 64 MB tile cache): the strip was dropped
    by the cache and decoded again for every read (a 64 MP one streamed 125x slower than in 64-row strips). The
    cache makes room for the largest segment, so twelve reads decode it once."""
    pixels = np.full((5000, 5000, 3), 240, np.uint8)
    pixels[1000:4000, 1000:4000] = (180, 90, 160)
    path = tmp_path / "one-strip.tif"
    tifffile.imwrite(
        path, pixels, rowsperstrip=5000, compression="zlib", resolution=(20000, 20000), resolutionunit="CENTIMETER"
    )
    from service.slides.readers.tiff_reader import TiffReader

    with TiffReader(path) as r:  # what `open_slide` picks for a stripped TIFF over 50 MP
        level = r._levels[0]
        assert (level.seg_w, level.seg_h) == (5000, 5000)
        calls = []
        decode = level.decode
        object.__setattr__(level, "decode", lambda *a, **k: calls.append(1) or decode(*a, **k))
        for y in range(0, 4800, 400):
            assert np.array_equal(r.read_region((y, y), 0, (200, 200)), pixels[y : y + 200, y : y + 200])
    assert len(calls) == 1
