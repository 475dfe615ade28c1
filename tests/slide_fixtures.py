"""Writers for derived containers of the same real pixels (CMU-1-Small-Region), shared by the slide tests.

`write_generic_tiff` makes a tiled JPEG pyramid as separate IFDs (OpenSlide "generic-tiff");
`write_ome_tiff` makes a pyramidal OME-TIFF with the reduced levels in SubIFDs (OpenSlide sees only level 0).
Both: 256-px JPEG tiles, µm/px in the resolution tags (cm), and OME PhysicalSize for the OME file.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import numpy as np
import openslide
import tifffile
from PIL import Image

TILE = 256
JPEG_QUALITY = 90


def halvings(pixels: np.ndarray, levels: int) -> list[np.ndarray]:
    """`pixels` (RGB) and `levels - 1` reductions, each the one before box-filtered to half its size."""
    out = [pixels]
    img = Image.fromarray(pixels)
    for _ in range(levels - 1):
        img = img.resize((max(1, img.width // 2), max(1, img.height // 2)), Image.Resampling.BOX)
        out.append(np.asarray(img))
    return out


def svs_pyramid(src: Path, levels: int = 4) -> tuple[list[np.ndarray], float]:
    """Level-0 RGB pixels of `src` and 2x box-filtered reductions, plus its µm/px."""
    with openslide.OpenSlide(str(src)) as s:
        rgba = s.read_region((0, 0), 0, s.dimensions)
        mpp = float(s.properties["openslide.mpp-x"])
    return halvings(np.asarray(rgba.convert("RGB")), levels), mpp


def _common(mpp: float, scale: int) -> dict:
    px_per_cm = 10_000.0 / (mpp * scale)
    return {
        "tile": (TILE, TILE),
        "photometric": "rgb",
        "compression": "jpeg",
        "compressionargs": {"level": JPEG_QUALITY},
        "resolution": (px_per_cm, px_per_cm),
        "resolutionunit": "CENTIMETER",
    }


def write_generic_tiff(src: Path, out: Path, levels: int = 4) -> Path:
    """Tiled JPEG pyramid, one IFD per level (reduced levels flagged as such)."""
    pyr, mpp = svs_pyramid(src, levels)
    with tifffile.TiffWriter(out) as tif:
        for i, arr in enumerate(pyr):
            tif.write(arr, subfiletype=1 if i else 0, **_common(mpp, 2**i))
    return out


def write_ome_tiff(src: Path, out: Path, levels: int = 4) -> Path:
    """Pyramidal OME-TIFF: level 0 in the main IFD, reductions in its SubIFDs."""
    pyr, mpp = svs_pyramid(src, levels)
    meta = {
        "axes": "YXS",
        "PhysicalSizeX": mpp,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": mpp,
        "PhysicalSizeYUnit": "µm",
    }
    with tifffile.TiffWriter(out, ome=True) as tif:
        tif.write(pyr[0], subifds=len(pyr) - 1, metadata=meta, **_common(mpp, 1))
        for i, arr in enumerate(pyr[1:], start=1):
            tif.write(arr, subfiletype=1, **_common(mpp, 2**i))
    return out


def write_both(src: Path, folder: Path) -> tuple[Path, Path]:
    """Both derived containers in `folder` (use from a session-scoped fixture: ~0.5 s)."""
    return (
        write_generic_tiff(src, folder / "cmu.generic-tiled.tif"),
        write_ome_tiff(src, folder / "cmu.pyramid.ome.tif"),
    )


def write_mirax(
    src: Path | np.ndarray, out: Path, levels: int = 3, tile: int = 256, quality: int = 90, mpp: float = 0.5
) -> Path:
    """A MIRAX slide (`out` = NAME.mrxs, plus the folder NAME/ with Slidedat.ini, Index.dat, Data0000.dat) of
    the real pixels of `src` (a slide, or RGB pixels at `mpp`): one camera image per 256 px tile, no overlaps and
    no position buffer (the simplest layout OpenSlide's MIRAX driver reads), level i made of 2^i x 2^i level-0
    images halved i times."""
    import configparser
    import io
    import struct
    import uuid

    if isinstance(src, np.ndarray):
        pyr = halvings(src, levels)
    else:
        pyr, mpp = svs_pyramid(src, levels)
    h0, w0 = pyr[0].shape[:2]
    nx, ny = -(-w0 // tile), -(-h0 // tile)
    folder = out.with_suffix("")
    folder.mkdir(parents=True, exist_ok=True)
    slide_id = str(uuid.UUID(int=0x4D5354415220))  # fixed: the files are reproducible
    data = io.BytesIO()
    data.write(b"01.02" + slide_id.encode() + b"\x00" * 16)  # a data file header; OpenSlide does not read it
    records: list[list[tuple[int, int, int]]] = []
    for i, level in enumerate(pyr):
        concat = 2**i
        recs = []
        for y in range(0, ny, concat):
            for x in range(0, nx, concat):
                px, py = x * tile // concat, y * tile // concat
                img = np.full((tile, tile, 3), 255, np.uint8)
                part = level[py : py + tile, px : px + tile]
                img[: part.shape[0], : part.shape[1]] = part
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="JPEG", quality=quality)
                recs.append((y * nx + x, data.tell(), buf.tell()))
                data.write(buf.getvalue())
        records.append(recs)
    (folder / "Data0000.dat").write_bytes(data.getvalue())

    index = io.BytesIO()
    index.write(b"01.02" + slide_id.encode())
    hier_root = index.tell()
    index.write(struct.pack("<ii", 0, 0))  # hier table pointer, nonhier table pointer (patched below)
    table = index.tell()
    index.write(b"\x00" * 4 * levels)  # one pointer per zoom level (patched below)
    level_ptrs = []
    for recs in records:
        head = index.tell()
        index.write(struct.pack("<ii", 0, head + 8))  # 0, pointer to the first (only) data page
        index.write(struct.pack("<ii", len(recs), 0))  # page length, next page (none)
        for image_index, offset, length in recs:
            index.write(struct.pack("<iiii", image_index, offset, length, 0))
        level_ptrs.append(head)
    nonhier = index.tell()
    index.write(struct.pack("<i", 0))
    raw = bytearray(index.getvalue())
    struct.pack_into("<ii", raw, hier_root, table, nonhier)
    struct.pack_into(f"<{levels}i", raw, table, *level_ptrs)
    (folder / "Index.dat").write_bytes(bytes(raw))

    ini = configparser.ConfigParser()
    ini.optionxform = str  # keys are case-sensitive for OpenSlide
    ini["GENERAL"] = {
        "SLIDE_VERSION": "01.03",
        "SLIDE_ID": slide_id,
        "IMAGENUMBER_X": str(nx),
        "IMAGENUMBER_Y": str(ny),
        "OBJECTIVE_MAGNIFICATION": "20",
        "CameraImageDivisionsPerSide": "1",
    }
    hier = {"HIER_COUNT": "1", "NONHIER_COUNT": "0", "INDEXFILE": "Index.dat"}
    hier.update({"HIER_0_NAME": "Slide zoom level", "HIER_0_COUNT": str(levels)})
    for i in range(levels):
        hier[f"HIER_0_VAL_{i}"] = f"ZoomLevel_{i}"
        hier[f"HIER_0_VAL_{i}_SECTION"] = f"LAYER_0_LEVEL_{i}_SECTION"
    ini["HIERARCHICAL"] = hier
    ini["DATAFILE"] = {"FILE_COUNT": "1", "FILE_0": "Data0000.dat"}
    for i in range(levels):
        ini[f"LAYER_0_LEVEL_{i}_SECTION"] = {
            "IMAGE_CONCAT_FACTOR": "0" if i == 0 else "1",
            "OVERLAP_X": "0",
            "OVERLAP_Y": "0",
            "MICROMETER_PER_PIXEL_X": str(mpp * 2**i),
            "MICROMETER_PER_PIXEL_Y": str(mpp * 2**i),
            "IMAGE_FILL_COLOR_BGR": "16777215",
            "DIGITIZER_WIDTH": str(tile),
            "DIGITIZER_HEIGHT": str(tile),
            "IMAGE_FORMAT": "JPEG",
        }
    with (folder / "Slidedat.ini").open("w") as fh:
        ini.write(fh, space_around_delimiters=False)
    with out.open("w") as fh:  # the .mrxs itself: the GENERAL section, as scanners write it
        fh.write(f"[GENERAL]\nSLIDE_ID={slide_id}\n")
    return out


def jpeg_segments(jpeg: bytes) -> dict[int, tuple[int, int]]:
    """{marker: (offset of its 0xFF, offset past its segment)} of a baseline JPEG's header, up to SOS."""
    at, found = 2, {}
    while jpeg[at] == 0xFF:
        marker, end = jpeg[at + 1], at + 2 + int.from_bytes(jpeg[at + 2 : at + 4], "big")
        found[marker] = (at, end)
        if marker == 0xDA:
            break
        at = end
    return found


def _restart_starts(jpeg: bytes) -> list[int]:
    """Byte offsets of each restart interval's entropy-coded data in a baseline JPEG: just after the SOS
    header, then just after each RSTn marker (what Hamamatsu stores as McuStarts)."""
    starts = [jpeg_segments(jpeg)[0xDA][1]]
    i = starts[0]
    while (i := jpeg.find(b"\xff", i)) >= 0 and i + 1 < len(jpeg):
        marker = jpeg[i + 1]
        if 0xD0 <= marker <= 0xD7:
            starts.append(i + 2)
        elif marker == 0xD9:  # EOI
            break
        i += 2  # 0xFF00 is a stuffed data byte; any other marker is skipped
    return starts


def _ndpi_page(
    jpeg: bytes,
    w: int,
    h: int,
    mpp: float,
    lens: float,
    at: int,
    last: bool,
    *,
    per_row: int = 1,
    chroma_x: int = 1,
    mcu_starts: bool = True,
) -> bytes:
    """One NDPI page whose IFD starts at file offset `at`: the IFD, then the JPEG strip and out-of-line tag
    values; unless `last`, its next-IFD offset points just past them. NDPI's IFD layout: classic 12-byte
    entries, then an 8-byte next-IFD offset and 4 high-order bytes per entry (all zero below 4 GB); libtiff
    reads it as classic TIFF, tifffile as NDPI. `per_row` restart intervals make one 8 px MCU row; chroma is
    subsampled `chroma_x` times horizontally (1 in 4:4:4, 2 in 4:2:2). Without `mcu_starts` the McuStarts tag
    is left out (OpenSlide then finds the intervals by scanning for restart markers)."""
    import struct

    starts = _restart_starts(jpeg)
    if len(starts) != -(-h // 8) * per_row:
        raise ValueError(f"{len(starts)} restart intervals for {h} px (8 px MCU rows of {per_row})")
    px_per_cm = round(10_000.0 / mpp)
    # (code, TIFF type, values): 2 ASCII, 3 SHORT, 4 LONG, 5 RATIONAL, 9 SLONG, 11 FLOAT
    tags = [
        (256, 4, [w]),
        (257, 4, [h]),
        (258, 3, [8, 8, 8]),
        (259, 3, [7]),  # JPEG
        (262, 3, [6]),  # YCbCr, as NDP.scan writes
        (271, 2, b"Hamamatsu\0"),
        (273, 4, [0]),  # StripOffsets, patched below
        (277, 3, [3]),
        (278, 4, [h]),
        (279, 4, [len(jpeg)]),
        (282, 5, [px_per_cm, 1]),
        (283, 5, [px_per_cm, 1]),
        (296, 3, [3]),  # centimetre
        (530, 3, [chroma_x, 1]),  # chroma subsampling: none, or 4:2:2
        (65420, 4, [1]),  # NDPI format flag
        (65421, 11, [lens]),  # source lens: this level's magnification
        (65422, 9, [0]),  # x offset from the slide centre, nm
        (65423, 9, [0]),  # y offset
        (65424, 9, [0]),  # focal plane
        (65426, 4, starts),  # McuStarts: each restart interval's offset in the strip (last: left out below)
    ][: None if mcu_starts else -1]
    fmt = {2: "s", 3: "H", 4: "I", 5: "I", 9: "i", 11: "f"}
    ifd_size = 2 + 16 * len(tags) + 8
    data = bytearray(jpeg)
    strip_at = at + ifd_size
    entries = []
    for code, kind, values in tags:
        count = len(values) // (2 if kind == 5 else 1) if kind != 2 else len(values)
        raw = values if kind == 2 else struct.pack(f"<{len(values)}{fmt[kind]}", *values)
        if code == 273:
            raw = struct.pack("<I", strip_at)
        if len(raw) <= 4:
            entries.append(struct.pack("<HHI", code, kind, count) + raw.ljust(4, b"\0"))
        else:
            if len(data) % 2:
                data += b"\0"
            entries.append(struct.pack("<HHII", code, kind, count, strip_at + len(data)))
            data += raw
    if len(data) % 2:
        data += b"\0"
    following = 0 if last else strip_at + len(data)
    high_bytes = b"\0" * 4 * len(tags)
    return struct.pack("<H", len(tags)) + b"".join(entries) + struct.pack("<Q", following) + high_bytes + data


def _jpeg_of_intervals(level: np.ndarray, interval_mcus: int, quality: int) -> bytes:
    """One baseline JPEG of `level` assembled interval by interval, for levels wider than libjpeg encodes
    (65,500 px; level 0 of most 40x slides): each 8 px high, `interval_mcus`-MCU piece is encoded on its own
    with the same standard tables (a restart interval starts from zero DC predictions, as a fresh image does),
    and the entropy-coded pieces are joined with RST0-7 in turn under one header, whose frame width is 0, as in
    NDPI levels that wide (OpenSlide and tifffile take the size from the TIFF tags)."""
    import io

    h, w = level.shape[:2]
    step = 8 * interval_mcus
    header, data = b"", []
    for y in range(0, h, 8):
        for x in range(0, w, step):
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(level[y : y + 8, x : x + step])).save(
                buf, "JPEG", quality=quality, subsampling=0
            )
            piece = buf.getvalue()
            seg = jpeg_segments(piece)
            header = header or piece[: seg[0xDA][1]]
            data.append(piece[seg[0xDA][1] : -2])  # the entropy-coded data, without EOI
    seg = jpeg_segments(header)
    sof, sos = seg[0xC0][0], seg[0xDA][0]
    dri = b"\xff\xdd\x00\x04" + interval_mcus.to_bytes(2, "big")
    header = header[: sof + 5] + h.to_bytes(2, "big") + b"\0\0" + header[sof + 9 : sos] + dri + header[sos:]
    joined = bytearray(data[0])
    for i, piece in enumerate(data[1:]):
        joined += bytes((0xFF, 0xD0 + i % 8)) + piece
    return header + bytes(joined) + b"\xff\xd9"


def write_ndpi(
    pixels: np.ndarray,
    out: Path,
    levels: int = 3,
    mpp: float = 0.2282,
    quality: int = 90,
    interval_mcus: int | None = None,
    chroma_422: bool = False,
    mcu_starts: bool = True,
) -> Path:
    """A Hamamatsu NDPI of `pixels` (RGB at `mpp`, 40x by default) that OpenSlide's hamamatsu driver and
    tifffile both read as NDPI: one page per level (2x box-filtered), each level one baseline JPEG strip
    (4:4:4, or 4:2:2 with 16 x 8 px MCUs) cut by restart markers, and the Hamamatsu tags OpenSlide needs
    (format flag, source lens, offsets, focal plane, McuStarts). No macro or map image; files stay under 4 GB
    (no high-order offset bytes). 4:2:0 is not offered: OpenSlide's NDPI driver cannot decode it (libjpeg
    reads ahead into the next interval for the vertical chroma context), so no NDPI that OpenSlide reads is.

    The restart interval is one MCU row by default (the sample's layout), else `interval_mcus` MCUs, which
    must divide every level's row: Bio-Formats' maintainers report 256 MCUs (2,048 px) in most scanner
    files (ome/bioformats#4455), and a level wider than libjpeg's 65,500 px limit (level 0 of most 40x slides)
    cannot be decoded by OpenSlide unless its rows are cut into several intervals."""
    import io
    import struct

    mcu = 16 if chroma_422 else 8  # MCU width; 8 rows high either way
    unit = mcu << (levels - 1)  # every level in whole MCUs, as scanners write them (OpenSlide reads a
    if pixels.shape[0] % unit or pixels.shape[1] % unit:  # partial-MCU NDPI level as black)
        raise ValueError(f"NDPI sides must be multiples of {unit} px for {levels} levels, not {pixels.shape[:2]}")
    pyr = halvings(np.ascontiguousarray(pixels), levels)
    if interval_mcus is not None and any(lv.shape[1] // mcu % interval_mcus for lv in pyr):
        raise ValueError(f"{interval_mcus}-MCU restart intervals do not divide every level's row of {mcu} px MCUs")
    restart = {"restart_marker_rows": 1} if interval_mcus is None else {"restart_marker_blocks": interval_mcus}
    pages = []
    for level in pyr:
        if level.shape[1] > 65_500 and interval_mcus is not None and not chroma_422:  # wider than libjpeg encodes
            pages.append(_jpeg_of_intervals(level, interval_mcus, quality))
            continue
        buf = io.BytesIO()
        Image.fromarray(level).save(buf, "JPEG", quality=quality, subsampling=1 if chroma_422 else 0, **restart)
        pages.append(buf.getvalue())
    with out.open("wb") as fh:
        fh.write(b"II" + struct.pack("<HQ", 42, 12))  # NDPI: the first-IFD offset is 8 bytes wide
        for i, (level, jpeg) in enumerate(zip(pyr, pages, strict=True)):
            h, w = level.shape[:2]
            per_row = 1 if interval_mcus is None else w // mcu // interval_mcus
            page = _ndpi_page(
                jpeg,
                w,
                h,
                mpp * 2**i,
                40.0 / 2**i,
                fh.tell(),
                i + 1 == len(pyr),
                per_row=per_row,
                chroma_x=mcu // 8,
                mcu_starts=mcu_starts,
            )
            fh.write(page)
    return out


def _ycbcr422_j2k(rgb: np.ndarray, workdir: Path, quality: float = 8.0) -> bytes:
    """One Aperio 33003 tile: JFIF YCbCr, Cb and Cr halved horizontally (4:2:2), coded by OpenJPEG's
    `opj_compress` (irreversible 9/7 wavelet, no component transform) as a raw J2K codestream."""
    import subprocess

    f = rgb.astype(np.float64)
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = 128 - 0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 128 + 0.5 * r - 0.418688 * g - 0.081312 * b

    def u8(a: np.ndarray) -> bytes:
        return np.clip(np.rint(a), 0, 255).astype(np.uint8).tobytes()

    h, w = y.shape
    raw, j2k = workdir / "tile.raw", workdir / "tile.j2k"
    raw.write_bytes(u8(y) + u8((cb[:, 0::2] + cb[:, 1::2]) / 2) + u8((cr[:, 0::2] + cr[:, 1::2]) / 2))
    fmt = f"{w},{h},3,8,u@1x1:2x1:2x1"
    subprocess.run(
        ["opj_compress", "-i", str(raw), "-o", str(j2k), "-F", fmt, "-mct", "0", "-I", "-r", str(quality)],
        check=True,
        capture_output=True,
    )
    return j2k.read_bytes()


def write_aperio_j2k_ycbcr(
    src: Path, out: Path, origin: tuple[int, int] = (768, 768), width: int = 1024, height: int = 768
) -> Path:
    """An Aperio SVS with JPEG 2000 YCbCr tiles (compression 33003, as Aperio's Matrox-based scanners write)
    of `width` x `height` real pixels of `src` from `origin` (a tissue-rich part of CMU-1-Small-Region): one
    level, 256 px tiles, MPP in the description, so OpenSlide's aperio driver reads it. Needs `opj_compress`
    (Debian libopenjp2-tools)."""
    with openslide.OpenSlide(str(src)) as s:
        rgb = np.asarray(s.read_region(origin, 0, (width, height)).convert("RGB"))
        mpp = float(s.properties["openslide.mpp-x"])
    work = out.parent / (out.stem + ".tiles")
    work.mkdir(parents=True, exist_ok=True)
    tiles = [
        _ycbcr422_j2k(rgb[y : y + TILE, x : x + TILE], work)
        for y in range(0, height, TILE)
        for x in range(0, width, TILE)
    ]
    desc = (
        f"Aperio Image Library v11.2.1\r\n{width}x{height} [0,0 {width}x{height}] ({TILE}x{TILE}) J2K/YUV16 Q=70"
        f"|AppMag = 20|MPP = {mpp}"
    )
    with tifffile.TiffWriter(out) as tif:
        tif.write(
            iter(tiles),
            shape=(height, width, 3),
            dtype=np.uint8,
            tile=(TILE, TILE),
            compression=33003,
            photometric="rgb",
            description=desc,
            metadata=None,
        )
    for f in work.iterdir():
        f.unlink()
    work.rmdir()
    return out


def write_sparse_dicom(src: Path, out: Path, drop: set[int]) -> Path:
    """A copy of the DICOM WSI series in `src` whose level 0 is TILED_SPARSE (a plane position per frame, as many
    scanners and converters write) with frames `drop` (row-major indices) left out, as a sparse series stores
    none where there is no tissue. New series and instance UIDs, so that a PACS holding `src` keeps both."""
    from pydicom.dataset import Dataset
    from pydicom.encaps import encapsulate
    from pydicom.sequence import Sequence

    def edit(ds, level: int, frames: list[bytes]) -> None:
        if level != 0:
            return
        across = -(-int(ds.TotalPixelMatrixColumns) // int(ds.Columns))
        keep = [i for i in range(len(frames)) if i not in drop]
        per_frame = []
        for i in keep:
            pos = Dataset()
            pos.ColumnPositionInTotalImagePixelMatrix = (i % across) * int(ds.Columns) + 1
            pos.RowPositionInTotalImagePixelMatrix = (i // across) * int(ds.Rows) + 1
            pos.XOffsetInSlideCoordinateSystem = pos.YOffsetInSlideCoordinateSystem = 0.0
            pos.ZOffsetInSlideCoordinateSystem = 0.0
            item = Dataset()
            item.PlanePositionSlideSequence = Sequence([pos])
            per_frame.append(item)
        ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
        ds.DimensionOrganizationType = "TILED_SPARSE"
        ds.NumberOfFrames = len(keep)
        ds.PixelData = encapsulate([frames[i] for i in keep])

    return write_dicom_variant(src, out, edit)


def write_transcoded_dicom(src: Path, out: Path, syntax: str) -> Path:
    """A copy of the DICOM WSI series in `src` with every frame decoded and stored again losslessly in transfer
    syntax `syntax` (JPEG 2000 1.2.840.10008.1.2.4.90, HTJ2K 1.2.840.10008.1.2.4.201 or JPEG-LS
    1.2.840.10008.1.2.4.80, as PACS archives keep slides, or uncompressed 1.2.840.10008.1.2.1), labelled RGB;
    new series and instance UIDs."""
    import imagecodecs
    import pydicom
    from pydicom.encaps import encapsulate, generate_frames
    from pydicom.uid import generate_uid

    encode = {
        "1.2.840.10008.1.2.4.90": lambda a: imagecodecs.jpeg2k_encode(a, level=0, codecformat="j2k"),
        "1.2.840.10008.1.2.4.201": lambda a: imagecodecs.htj2k_encode(a),
        "1.2.840.10008.1.2.4.80": lambda a: imagecodecs.jpegls_encode(a, level=0),
        "1.2.840.10008.1.2.1": None,
    }[syntax]
    out.mkdir(parents=True)
    series = generate_uid()
    for f in sorted(src.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        frames = [
            imagecodecs.jpeg8_decode(fr)
            for fr in generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames))
        ]
        if syntax == "1.2.840.10008.1.2.1":  # uncompressed, frame after frame
            ds.PixelData = b"".join(np.ascontiguousarray(a).tobytes() for a in frames)
            ds["PixelData"].VR = "OB"
            ds.PlanarConfiguration = 0
        else:
            ds.PixelData = encapsulate([encode(a) for a in frames])
        ds.file_meta.TransferSyntaxUID = syntax
        ds.PhotometricInterpretation = "RGB"
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(out / f.name)
    return out


def write_dicom_variant(src: Path, out: Path, edit) -> Path:
    """A copy of the DICOM WSI series in `src` (new series and instance UIDs) with each file passed through
    `edit(ds, level, frames)`: `level` is the pyramid level its name gives ("level-N-..."), `frames` its
    encapsulated frames. `edit` changes `ds` in place and returns None, or returns the files `[(name, ds)]` to
    write in its place (several for a level split into parts, none to leave it out)."""
    import pydicom
    from pydicom.encaps import generate_frames
    from pydicom.uid import generate_uid

    out.mkdir(parents=True)
    series = generate_uid()
    for f in sorted(src.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
        written = edit(ds, int(f.name.split("-")[1]), frames)
        for name, d in [(f.name, ds)] if written is None else written:
            d.save_as(out / name)
    return out


def concatenation(splits: list[int]):
    """A `write_dicom_variant` edit storing level 0 as a concatenation: parts starting at the frames `splits`
    (0-based, after 0), each its own instance with the concatenation attributes, as converters split levels
    too large for one file."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import generate_uid

    def edit(ds, level: int, frames: list[bytes]):
        if level != 0:
            return None
        bounds = [0, *splits, len(frames)]
        uid, parts = generate_uid(), []
        for k, (a, b) in enumerate(itertools.pairwise(bounds)):
            part = copy.deepcopy(ds)
            part.SOPInstanceUID = part.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            part.ConcatenationUID = uid
            part.SOPInstanceUIDOfConcatenationSource = ds.SOPInstanceUID
            part.ConcatenationFrameOffsetNumber = a
            part.InConcatenationNumber = k + 1
            part.InConcatenationTotalNumber = len(bounds) - 1
            part.NumberOfFrames = b - a
            part.PixelData = encapsulate(frames[a:b])
            parts.append((f"level-0-part-{k}.dcm", part))
        return parts

    return edit


def focal_planes(count: int):
    """A `write_dicom_variant` edit storing `count` (odd) focal planes of level 0 in its one TILED_FULL instance,
    as a Z-stack scanner writes them: the original frames the middle plane (the nominal focus, which readers
    show), inverted copies above and below."""
    import imagecodecs
    from pydicom.encaps import encapsulate

    def edit(ds, level: int, frames: list[bytes]):
        measures = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        measures.SpacingBetweenSlices = measures.SliceThickness = 0.001
        if level == 0:
            inverted = [imagecodecs.jpeg8_encode(255 - imagecodecs.jpeg8_decode(f), level=95) for f in frames]
            ds.TotalPixelMatrixFocalPlanes = ds.NumberOfFocalPlanes = count
            ds.DistanceBetweenFocalPlanes = 0.001
            ds.NumberOfFrames = count * len(frames)
            ds.PixelData = encapsulate(inverted * (count // 2) + frames + inverted * (count // 2))
        return None

    return edit
