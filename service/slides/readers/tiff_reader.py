"""tifffile reader: OME-TIFF with SubIFD pyramids (OpenSlide sees only their level 0) and TIFF layouts
OpenSlide refuses. Also `inspect_tiff`, the header-only sanity check run on every TIFF before decoding.

Segments (tiles or strips) are read under a lock (one shared file handle) and decoded outside it, so
concurrent `read_region` calls are safe and decode in parallel (imagecodecs releases the GIL).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from service.errors import CorruptSlideError, SlideError, SlideTooLargeError, UnsupportedFormatError
from service.slides.base import Mpp, SlideReader
from service.slides.headers import declared_size
from service.slides.mpp import from_ome_xml, from_tiff_resolution
from service.slides.readers._common import (
    TileCache,
    check_dimensions,
    check_region,
    downsamples_from,
    to_rgb,
    white,
)

# A single tile/strip bigger than this (decoded) is a bomb, or a layout that cannot be read lazily.
MAX_SEGMENT_PIXELS = 64 * 1024 * 1024
MAX_PAGES = 1000


@dataclass(frozen=True)
class TiffInfo:
    width: int
    height: int
    tiled: bool
    levels: int  # pyramid levels tifffile finds in the first series
    subifds: int  # SubIFDs under the first page (a SubIFD pyramid, which OpenSlide ignores)
    pages: int


def _page_checks(page: Any, file_size: int, max_side: int, name: str, what: str) -> None:
    shape = page.shape
    h, w = int(page.imagelength), int(page.imagewidth)
    if max(w, h) > max_side:
        raise SlideTooLargeError(f"{what} declares {w}x{h} px, over the limit of {max_side} px per side", slide=name)
    if w <= 0 or h <= 0 or not shape:
        raise CorruptSlideError(f"{what} declares an empty image", slide=name)
    offsets, counts = page.dataoffsets, page.databytecounts
    expected = math.prod(page.chunked) if getattr(page, "chunked", None) else len(offsets)
    if len(offsets) != expected or len(counts) != len(offsets):
        raise CorruptSlideError(
            f"{what} lists {len(offsets)} tiles/strips where its size implies {expected}", slide=name
        )
    seg = page.chunks if getattr(page, "chunks", None) else shape
    if math.prod(seg[:2]) > MAX_SEGMENT_PIXELS:
        raise SlideTooLargeError(
            f"{what} stores {seg[1]}x{seg[0]} px per tile/strip; too large to decode safely", slide=name
        )
    if len(offsets):
        end = max(int(o) + int(c) for o, c in zip(offsets, counts, strict=True))
        if end > file_size:
            raise CorruptSlideError(
                f"file is truncated: {what} needs {end} bytes but the file has {file_size}", slide=name
            )


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def tifffile_warnings() -> Iterator[list[str]]:
    """tifffile logs (rather than raises) broken IFD chains; collect those so we can refuse the file."""
    logger = logging.getLogger("tifffile")
    handler = _Collect()
    old_propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = old_propagate


def first_page(tif: tifffile.TiffFile, name: str) -> Any:
    try:
        return tif.pages.first
    except (IndexError, ValueError) as exc:
        raise CorruptSlideError("file is truncated or damaged: no readable TIFF directory", slide=name) from exc


def inspect_tiff(path: str | Path, *, max_side: int = 200_000) -> TiffInfo:
    """Header-only checks: declared sizes, tile counts, tile offsets inside the file. Decodes nothing."""
    path = Path(path)
    size = os.path.getsize(path)
    try:
        with tifffile_warnings() as warned, tifffile.TiffFile(path) as tif:
            first = first_page(tif, path.name)
            for i, page in enumerate(tif.pages):
                if i >= MAX_PAGES:  # IFD chains can loop or be huge; a slide has a handful of images
                    raise CorruptSlideError(f"file holds more than {MAX_PAGES} images", slide=path.name)
                _page_checks(page, size, max_side, path.name, f"page {i}")
            broken = [m for m in warned if "offset" in m or "corrupt" in m.lower() or "truncat" in m.lower()]
            if broken:
                detail = re.sub(r"^<[^>]*>\s*", "", broken[0])  # drop tifffile's object repr
                raise CorruptSlideError(f"file is truncated or damaged: {detail}", slide=path.name)
            series = tif.series[0] if tif.series else None
            levels = len(series.levels) if series is not None else 1
            if series is not None:
                for li, lvl in enumerate(series.levels[1:], start=1):
                    _page_checks(lvl.keyframe, size, max_side, path.name, f"pyramid level {li}")
            return TiffInfo(
                int(first.imagewidth),
                int(first.imagelength),
                bool(first.is_tiled),
                levels,
                len(first.subifds or ()),
                len(tif.pages),
            )
    except SlideError:
        raise
    except Exception as exc:  # tifffile raises many types on damaged headers
        raise CorruptSlideError(f"TIFF structure cannot be parsed ({exc})", slide=path.name) from exc


@dataclass
class _Level:
    page: Any
    width: int
    height: int
    seg_w: int
    seg_h: int
    across: int
    offsets: Any
    counts: Any
    decode: Any
    jpegtables: bytes | None


class TiffReader(SlideReader):
    def __init__(self, path: str | Path, *, max_side: int = 200_000) -> None:
        self.path = Path(path)
        name = self.path.name
        try:
            self._tif = tifffile.TiffFile(self.path)
        except Exception as exc:
            raise CorruptSlideError(f"TIFF cannot be opened ({exc})", slide=name) from exc
        try:
            self._levels = self._load_levels(max_side)
            self.mpp = self._read_mpp()
        except Exception:
            self._tif.close()
            raise
        self.vendor = "ome-tiff" if self._tif.is_ome else "generic-tiff"
        self.level_dimensions = tuple((lv.width, lv.height) for lv in self._levels)
        self.level_downsamples = downsamples_from(list(self.level_dimensions))
        self.associated_names = ()
        self._lock = threading.Lock()
        self._fh = self._tif.filehandle
        # room for the largest decoded segment at least: a strip over the default 64 MB (a one-strip 64 MP TIFF) was
        # dropped by the cache and decoded again for every read, 125x slower than the same pixels in 64-row strips
        largest = max(lv.seg_w * lv.seg_h * lv.page.samplesperpixel * lv.page.dtype.itemsize for lv in self._levels)
        self._cache = TileCache(max(64 << 20, largest + (8 << 20)))

    def _load_levels(self, max_side: int) -> list[_Level]:
        name = self.path.name
        try:
            series = self._tif.series[0]
            pages = [lvl.keyframe for lvl in series.levels]
        except Exception as exc:
            raise CorruptSlideError(f"TIFF pyramid cannot be parsed ({exc})", slide=name) from exc
        levels = []
        for page in pages:
            if page.planarconfig != 1 and page.samplesperpixel > 1:
                raise UnsupportedFormatError("planar-separate TIFF samples are not supported", slide=name)
            if page.samplesperpixel not in (1, 2, 3, 4) or page.imagedepth != 1:
                raise UnsupportedFormatError(
                    f"TIFF with {page.samplesperpixel} samples/depth {page.imagedepth} is not a brightfield RGB slide",
                    slide=name,
                )
            w, h = int(page.imagewidth), int(page.imagelength)
            if page.is_tiled:
                sw, sh = int(page.tilewidth), int(page.tilelength)
            else:
                sw, sh = w, min(h, int(page.rowsperstrip) or h)
            levels.append(
                _Level(
                    page,
                    w,
                    h,
                    sw,
                    sh,
                    math.ceil(w / sw),
                    page.dataoffsets,
                    page.databytecounts,
                    page.decode,
                    page.jpegtables,
                )
            )
        check_dimensions([(lv.width, lv.height) for lv in levels], max_side, name)
        return levels

    def _read_mpp(self) -> Mpp | None:
        if self._tif.is_ome:
            m = from_ome_xml(self._tif.ome_metadata)
            if m is not None:
                return m
        page = self._levels[0].page
        tags = page.tags
        if "XResolution" not in tags:
            return None

        def ratio(tag: str) -> float | None:
            t = tags.get(tag)
            if t is None:
                return None
            v = t.value
            if isinstance(v, tuple):
                return v[0] / v[1] if v[1] else None
            return float(v)

        unit = tags.get("ResolutionUnit")
        return from_tiff_resolution(
            ratio("XResolution"), ratio("YResolution"), int(unit.value) if unit is not None else 2
        )

    def _segment(self, lv: _Level, index: int) -> np.ndarray | None:
        """Decoded segment `[sh, sw, S]`, or None when the file stores no data for it (sparse)."""
        offset, count = int(lv.offsets[index]), int(lv.counts[index])
        if count == 0:
            return None
        with self._lock:
            self._fh.seek(offset)
            data = self._fh.read(count)
        try:
            declared = declared_size(data)  # before the decoder allocates what a hostile header claims
            if declared is not None and (declared[0] > lv.seg_w or declared[1] > lv.seg_h):
                raise ValueError(f"its header says {declared[0]}x{declared[1]} px, the file {lv.seg_w}x{lv.seg_h}")
            arr = lv.decode(data, index, jpegtables=lv.jpegtables)[0]
        except Exception as exc:
            raise CorruptSlideError(f"tile {index} cannot be decoded ({exc})", slide=self.path.name) from exc
        if arr is None:
            return None
        arr = np.asarray(arr)
        return arr.reshape(arr.shape[-3:]) if arr.ndim > 3 else arr

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        x, y, level, w, h = check_region(location, level, size, self.level_count, self.path.name)
        lv = self._levels[level]
        ds = self.level_downsamples[level]
        lx, ly = round(x / ds), round(y / ds)  # nearest level pixel, as OpenSlide lands
        out = white(h, w)
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + w, lv.width), min(ly + h, lv.height)
        if x1 <= x0 or y1 <= y0:
            return out
        for sy in range(y0 // lv.seg_h, (y1 - 1) // lv.seg_h + 1):
            for sx in range(x0 // lv.seg_w, (x1 - 1) // lv.seg_w + 1):
                index = sy * lv.across + sx
                seg = self._cache.get((level, index))
                if seg is None:
                    raw = self._segment(lv, index)
                    if raw is None:
                        continue
                    seg = to_rgb(raw)
                    self._cache.put((level, index), seg)
                gx, gy = sx * lv.seg_w, sy * lv.seg_h  # segment origin in level px
                cx0, cy0 = max(x0, gx), max(y0, gy)
                cx1 = min(x1, gx + lv.seg_w, gx + seg.shape[1])
                cy1 = min(y1, gy + lv.seg_h, gy + seg.shape[0])
                if cx1 <= cx0 or cy1 <= cy0:
                    continue
                out[cy0 - ly : cy1 - ly, cx0 - lx : cx1 - lx] = seg[cy0 - gy : cy1 - gy, cx0 - gx : cx1 - gx]
        return out

    def close(self) -> None:
        self._cache.clear()
        self._tif.close()
