"""DICOM WSI (VL Whole Slide Microscopy) through wsidicom: a series folder, or one file plus its siblings
of the same series (as OpenSlide does).

Colour mislabel: some converters (an old Google wsi2dcm) store JFIF (YCbCr) JPEG frames but label them
PhotometricInterpretation=RGB. wsidicom and OpenSlide trust the label and skip YCbCr->RGB, which turns
tissue pink and the background grey-pink. We read each frame's own markers (JFIF APP0, Adobe APP14
transform flag, component ids) and, when they contradict the label, decode the frame the way its stream says.
"""

from __future__ import annotations

import logging
import math
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from service.errors import (
    CorruptSlideError,
    MissingMppError,
    SlideError,
    SlideTooLargeError,
    UnsupportedFormatError,
)
from service.slides.base import SlideReader
from service.slides.headers import check_size, declared_size, jpeg_scan_intact
from service.slides.jpeg import decode_rgb
from service.slides.mpp import from_pixel_spacing
from service.slides.readers._common import (
    TileCache,
    check_dimensions,
    check_region,
    downsamples_from,
    to_rgb,
    white,
)

# wsidicom warns with file paths and Study/Series/Frame-of-Reference UIDs (an instance whose frame of reference
# differs from its series', nine lines a slide): patient-linked metadata that the service never logs
logging.getLogger("wsidicom").setLevel(logging.ERROR)

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
JPEG_SYNTAXES = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"}
_MAX_TILE_SIDE = 16384


def jpeg_stream_colour(data: bytes) -> str | None:
    """What a JPEG stream says about its own colour space: "ycbcr", "rgb", or None when it says nothing.

    Follows libjpeg's rules: an Adobe APP14 transform flag wins, then a JFIF APP0 (always YCbCr), then
    component ids 'R','G','B'."""
    if not data.startswith(b"\xff\xd8"):
        return None
    i, n = 2, len(data)
    jfif, adobe, ids = False, None, None
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        seg_len = int.from_bytes(data[i + 2 : i + 4], "big")
        payload = data[i + 4 : i + 2 + seg_len]
        if marker == 0xE0 and payload.startswith(b"JFIF\x00"):
            jfif = True
        elif marker == 0xEE and payload.startswith(b"Adobe") and len(payload) >= 12:
            adobe = payload[11]
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and len(payload) >= 6:
            nc = payload[5]
            ids = bytes(payload[6 + 3 * k] for k in range(nc) if 6 + 3 * k < len(payload))
        elif marker == 0xDA:  # start of scan: all headers seen
            break
        i += 2 + seg_len
    if ids is not None and len(ids) != 3:
        return None
    if adobe is not None:
        return "ycbcr" if adobe == 1 else "rgb"
    if jfif:
        return "ycbcr"
    if ids == b"RGB":
        return "rgb"
    return None


def _series_files(path: Path) -> list[Path]:
    """The file itself plus DICOM siblings of the same series (other pyramid levels, label, overview)."""
    import pydicom

    def series_uid(p: Path) -> str | None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
                return str(ds.get("SeriesInstanceUID", "")) or None
        except Exception:
            return None

    uid = series_uid(path)
    files = [path]
    if uid is None:
        return files
    for sib in sorted(path.parent.iterdir()):
        if sib != path and sib.is_file() and _is_dicom(sib) and series_uid(sib) == uid:
            files.append(sib)
    return files


def _is_dicom(p: Path) -> bool:
    try:
        with p.open("rb") as fh:
            return fh.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _header_checks(files: list[Path], max_side: int, name: str) -> list[Path]:
    """The whole-slide image files among `files` (a series folder may also hold annotations or a
    DICOMDIR), after a bomb guard from headers alone: matrix size per side, tile size, frames vs tile grid."""
    import pydicom

    wsi_files, other = [], []
    with warnings.catch_warnings():
        # pydicom converts values lazily and warns about real files' over-long UIDs; not our concern here.
        warnings.simplefilter("ignore")
        for f in files:
            try:
                ds = pydicom.dcmread(f, stop_before_pixels=True)
            except Exception as exc:
                raise CorruptSlideError(f"DICOM header of {f.name} cannot be parsed ({exc})", slide=name) from exc
            if str(ds.get("SOPClassUID", "")) != WSI_SOP_CLASS:
                uid = ds.get("SOPClassUID")
                other.append(f"{f.name}: '{getattr(uid, 'name', None) or uid or 'no SOP class'}'")
                continue
            _header_check(ds, f, max_side, name)
            wsi_files.append(f)
    if not wsi_files:
        raise UnsupportedFormatError(
            f"no whole-slide image (VL Whole Slide Microscopy Image Storage) here; found {other[0]}"
            + (f" and {len(other) - 1} more" if len(other) > 1 else ""),
            slide=name,
        )
    return wsi_files


def _matrix_and_tile(ds: Any) -> tuple[int, int, int, int]:
    """(columns, rows) of the instance's total pixel matrix and (width, height) of its frames, 0 where absent."""
    cols = int(ds.get("TotalPixelMatrixColumns", ds.get("Columns", 0)) or 0)
    rows = int(ds.get("TotalPixelMatrixRows", ds.get("Rows", 0)) or 0)
    return cols, rows, int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0)


def _header_check(ds: Any, f: Path, max_side: int, name: str) -> None:
    cols, rows, tw, th = _matrix_and_tile(ds)
    if max(cols, rows) > max_side:
        raise SlideTooLargeError(
            f"{f.name} declares {cols}x{rows} px, over the limit of {max_side} px per side", slide=name
        )
    if tw <= 0 or th <= 0 or cols <= 0 or rows <= 0:
        raise CorruptSlideError(f"{f.name} declares an empty image or tile size", slide=name)
    if max(tw, th) > _MAX_TILE_SIDE:
        raise SlideTooLargeError(f"{f.name} stores {tw}x{th} px frames; too large to decode safely", slide=name)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    expected = matrix_frames(ds)
    if frames > expected:
        raise CorruptSlideError(f"{f.name} holds {frames} frames but its size allows at most {expected}", slide=name)


def matrix_frames(ds: Any) -> int:
    """Frames a full tiling of the instance's total pixel matrix holds: tiles x focal planes x optical paths."""
    cols, rows, tw, th = _matrix_and_tile(ds)
    planes = max(1, int(ds.get("TotalPixelMatrixFocalPlanes", 1) or 1))
    paths = max(1, int(ds.get("NumberOfOpticalPaths", 1) or 1))
    return math.ceil(cols / tw) * math.ceil(rows / th) * planes * paths


def no_spacing(exc: BaseException, name: str) -> None:
    """Raise `MissingMppError` where wsidicom refused a series for want of pixel spacing (its error carries no
    message): it matches pyramid levels by their spacing, so the series cannot be opened at all, and a µm/px
    override cannot stand in for it."""
    from wsidicom.errors import WsiDicomNoResolutionError

    if isinstance(exc, WsiDicomNoResolutionError):
        raise MissingMppError(
            "the series' VOLUME images declare no usable PixelSpacing (Pixel Measures in the Shared Functional "
            "Groups, required for whole-slide microscopy images; missing, zero, or given only per frame). The "
            "pyramid's levels are matched by it, so the series cannot be opened and a µm/px override cannot "
            "stand in: export the series again with its pixel spacing",
            slide=name,
        ) from exc


class DicomReader(SlideReader):
    def __init__(self, path: str | Path, *, max_side: int = 200_000) -> None:
        from wsidicom import WsiDicom

        self.path = Path(path)
        name = self.path.name
        files = (
            sorted(p for p in self.path.iterdir() if p.is_file() and _is_dicom(p))
            if self.path.is_dir()
            else _series_files(self.path)
        )
        if not files:
            raise UnsupportedFormatError("no DICOM files found", slide=name)
        files = _header_checks(files, max_side, name)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pydicom warns about over-long UIDs in real files
                self._wsi = WsiDicom.open(files)
        except Exception as exc:  # wsidicom raises its own errors, pydicom's, and ValueError/KeyError
            no_spacing(exc, name)
            raise UnsupportedFormatError(
                "DICOM is not a readable whole-slide image (needs a tiled VL Whole Slide Microscopy series "
                f"with ImageType VOLUME and pixel spacing; wsidicom said: {exc})",
                slide=name,
            ) from exc
        try:
            self._setup(max_side)
        except SlideError:
            self._wsi.close()
            raise
        except Exception as exc:
            self._wsi.close()
            raise CorruptSlideError(f"DICOM metadata cannot be read ({exc})", slide=name) from exc

    def _setup(self, max_side: int) -> None:
        self._levels: list[Any] = list(self._wsi.levels)
        self.level_dimensions = tuple((int(lv.size.width), int(lv.size.height)) for lv in self._levels)
        check_dimensions(list(self.level_dimensions), max_side, self.path.name)
        self.level_downsamples = downsamples_from(list(self.level_dimensions))
        self._tile_sizes = [(int(lv.tile_size.width), int(lv.tile_size.height)) for lv in self._levels]
        spacing = self._levels[0].pixel_spacing  # SizeMm(width = column spacing, height = row spacing)
        self.mpp = from_pixel_spacing((spacing.height, spacing.width)) if spacing is not None else None
        self.vendor = "dicom"
        names = []
        if self._wsi.labels:
            names.append("label")
        if self._wsi.overviews:
            names.append("macro")
        self.associated_names = tuple(names)
        # per level, as converters may write levels differently (`photometric` is level 0's, for reports)
        self.photometrics = [str(lv.default_instance.dataset.photometric_interpretation) for lv in self._levels]
        self.photometric = self.photometrics[0]
        self._jpeg = [
            str(getattr(lv.default_instance.image_data, "transfer_syntax", "")) in JPEG_SYNTAXES for lv in self._levels
        ]
        # what each level's first stored JPEG frame says of its colour, and the correction where its label disagrees
        self._stream_colours = [self._stream_colour(i) for i in range(len(self._levels))]
        self._corrections = [self._mislabel(i) for i in range(len(self._levels))]
        # each level's frame decoder (wsidicom's, from its first instance), where wsidicom exposes one
        self._decoders = [
            getattr(getattr(getattr(lv, "default_instance", None), "image_data", None), "decoder", None)
            for lv in self._levels
        ]
        self.colour_correction = next((c for c in self._corrections if c), None)
        self._cache = TileCache()
        self._inflight: dict[tuple[int, int, int], threading.Lock] = {}
        self._inflight_lock = threading.Lock()

    def _stream_colour(self, level: int) -> str | None:
        """What the first stored frame of a JPEG level says of its colour (`jpeg_stream_colour`), judged on a
        stored frame: a sparse level often stores none at its top-left corner, and wsidicom gives its own blank
        tile there. None for other codecs, or where it says nothing."""
        if not self._jpeg[level]:
            return None
        tile = self._first_stored_tile(level)
        if tile is None:
            return None
        try:
            data = self._wsi.read_encoded_tile(self._levels[level].level, tile, crop_to_image_boundary=False)
        except Exception:
            return None
        return jpeg_stream_colour(data)

    def _mislabel(self, level: int) -> str | None:
        """ "jfif-ycbcr-labelled-rgb" when JPEG frames carry YCbCr markers but the level's own header says RGB
        ("rgb-labelled-ybr" the other way round)."""
        stream = self._stream_colours[level]
        photometric = self.photometrics[level]
        if photometric == "RGB" and stream == "ycbcr":
            return "jfif-ycbcr-labelled-rgb"
        if photometric.startswith("YBR") and stream == "rgb":
            return "rgb-labelled-ybr"
        return None

    def _first_stored_tile(self, level: int) -> tuple[int, int] | None:
        """The first tile in row-major order that `level` stores a frame for (default focal plane and optical
        path): (0, 0) in a TILED_FULL level, the first placed frame in a TILED_SPARSE one; None if it stores none."""
        data = self._levels[level].default_instance.image_data
        planes = getattr(getattr(data, "tiles", None), "planes", None)
        if planes is None:  # a full tile index: every tile is stored
            return (0, 0)
        plane = planes.get((data.default_z, data.default_path))
        if plane is None:
            return None
        xs, ys = np.nonzero(np.asarray(plane.plane) >= 0)  # the plane is indexed [column, row]
        if not len(xs):
            return None
        first = int(np.lexsort((xs, ys))[0])
        return int(xs[first]), int(ys[first])

    def _tile(self, level: int, tx: int, ty: int) -> np.ndarray:
        """One stored tile, decoded once even when reader threads ask for it together (over DICOMweb each
        decode is a frame fetched from the PACS, so a duplicate costs a network round trip and its bytes)."""
        key = (level, tx, ty)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        with self._inflight_lock:
            lock = self._inflight.setdefault(key, threading.Lock())
        with lock:
            tile = self._cache.get(key)
            if tile is None:
                tile = self._decode_tile(level, tx, ty)
                self._cache.put(key, tile)
        with self._inflight_lock:
            self._inflight.pop(key, None)
        return tile

    def fast_level(self, level: int) -> DicomLevel:
        """`level`'s frames for the patch reader's tile path (`fasttiles.FastTiffSource`)."""
        return DicomLevel(self, level)

    def tile_size(self, level: int) -> tuple[int, int]:
        """(width, height) of the stored frames of `level`."""
        return self._tile_sizes[level]

    def decode_frame(self, level: int, tx: int, ty: int) -> np.ndarray:
        """Stored frame (tx, ty) of `level` as uint8 RGB, fetched and decoded now (no cache): what the tile path
        (`DicomLevel`) cuts patches from."""
        return self._decode_tile(level, tx, ty)

    def _decode_tile(self, level: int, tx: int, ty: int) -> np.ndarray:
        lv = self._levels[level].level
        try:
            # the frame's own header, before any decoder allocates what it claims (a JPEG frame claiming
            # 60,000 x 60,000 px had wsidicom's decoder ask for 10 GB); raw frames are sized by the tags
            data = self._wsi.read_encoded_tile(lv, (tx, ty), crop_to_image_boundary=False)
            declared = declared_size(data)
            if declared is not None:
                check_size(declared, self._tile_sizes[level], "frame")
            # libjpeg decodes a frame cut short to grey without an error (only a warning): refused instead. A frame
            # item may end in one padding NUL (items have even lengths).
            if self._jpeg[level] and data[:2] == b"\xff\xd8" and not jpeg_scan_intact(data.rstrip(b"\x00")):
                raise CorruptSlideError(
                    f"frame ({tx}, {ty}) of level {level} is cut short or damaged (its JPEG scan is incomplete)",
                    slide=self.path.name,
                )
            if self._stream_colours[level] is not None:
                # the frame's markers name its colour, so libjpeg reads it right (the label corrected where it
                # disagrees), strictly: damaged data is refused, not decoded to wrong pixels (`jpeg`)
                return to_rgb(decode_rgb(data))
            # decode the bytes already fetched with the decoder wsidicom would use: asking wsidicom for the
            # tile fetched the frame again (a PACS-backed slide read 2.5 MB for a 2.1 MB series)
            decoder = self._decoders[level]
            if decoder is not None:
                return to_rgb(np.asarray(decoder.decode(data)))
            img = self._wsi.read_tile(lv, (tx, ty), crop_to_image_boundary=False)
            return to_rgb(np.asarray(img))
        except SlideError:
            raise
        except Exception as exc:
            raise CorruptSlideError(
                f"frame ({tx}, {ty}) of level {level} cannot be decoded ({exc})", slide=self.path.name
            ) from exc

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        x, y, level, w, h = check_region(location, level, size, self.level_count, self.path.name)
        lw, lh = self.level_dimensions[level]
        tw, th = self._tile_sizes[level]
        ds = self.level_downsamples[level]
        lx, ly = round(x / ds), round(y / ds)  # nearest level pixel, as OpenSlide lands
        out = white(h, w)
        x0, y0, x1, y1 = max(lx, 0), max(ly, 0), min(lx + w, lw), min(ly + h, lh)
        if x1 <= x0 or y1 <= y0:
            return out
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                tile = self._tile(level, tx, ty)
                gx, gy = tx * tw, ty * th
                cx0, cy0 = max(x0, gx), max(y0, gy)
                cx1, cy1 = min(x1, gx + tile.shape[1]), min(y1, gy + tile.shape[0])
                if cx1 > cx0 and cy1 > cy0:
                    out[cy0 - ly : cy1 - ly, cx0 - lx : cx1 - lx] = tile[cy0 - gy : cy1 - gy, cx0 - gx : cx1 - gx]
        return out

    def read_associated(self, name: str, *, allow_phi: bool = False) -> np.ndarray:
        if name not in self.associated_names or not allow_phi:
            return super().read_associated(name, allow_phi=allow_phi)
        try:
            img = self._wsi.read_label() if name == "label" else self._wsi.read_overview()
        except Exception as exc:
            raise CorruptSlideError(
                f"associated image {name!r} cannot be decoded ({exc})", slide=self.path.name
            ) from exc
        return to_rgb(np.asarray(img))

    def describe(self) -> dict:
        return {**super().describe(), "colour_correction": self.colour_correction}

    def close(self) -> None:
        self._cache.clear()
        self._wsi.close()


class DicomLevel:
    """One level's stored frames as the patch reader's tile path sees a level (`fasttiles.FastTiffSource`):
    patches are cut out of frames each decoded once, by the reader's own decode (`DicomReader.decode_frame`:
    wsidicom's decoder, the colour fix, a DICOMweb fetch for a PACS series), so its pixels are `read_region`'s.
    No batch decoder takes its frames (`batchable`): a DICOM frame's colour can come from its tags, not only
    its stream."""

    kind = "dicom"
    codec = "dicom"
    planar = False
    batchable = False  # no batch decoder: the reader's own decode, frame by frame

    def __init__(self, reader: DicomReader, level: int) -> None:
        self.reader, self.index = reader, level
        self.path = reader.path
        self.width, self.height = reader.level_dimensions[level]
        self.tile_w, self.tile_h = reader.tile_size(level)
        self.tiles_x = -(-self.width // self.tile_w)
        self.tiles_y = -(-self.height // self.tile_h)

    def tile_shape(self, key: tuple[int, int]) -> None:
        return None  # the reader's decoders allocate their own arrays

    def decode_tile(self, key: tuple[int, int], out: np.ndarray | None = None) -> np.ndarray:
        """Frame `key` as uint8 RGB [tile_h, tile_w, 3]; a frame stored smaller (cropped at the image's edge)
        is padded white, as `read_region` leaves what no frame covers."""
        tile = self.reader.decode_frame(self.index, *key)
        h, w = tile.shape[:2]
        if (h, w) == (self.tile_h, self.tile_w):
            return tile
        if h > self.tile_h or w > self.tile_w:
            raise CorruptSlideError(
                f"frame {key} of level {self.index} is {w}x{h} px, larger than the {self.tile_w}x{self.tile_h} "
                "its tags give it",
                slide=self.path.name,
            )
        padded = white(self.tile_h, self.tile_w)
        padded[:h, :w] = tile
        return padded

    def close(self) -> None:
        pass  # the reader owns the files (or the PACS connection)
