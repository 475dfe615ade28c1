"""Fast patch source for tiled TIFF pyramids (Aperio SVS, generic tiled TIFF, OME-TIFF): decode each stored
tile once and cut patches out of the decoded tiles.

Why: OpenSlide's `read_region` spends most of each call outside JPEG decoding (region setup, cache
lookups, cairo compositing, RGBA -> RGB), and a 224 px patch straddles about four 256 px stored tiles. Here
the raw tile bytes are read with `os.pread` (thread-safe, releases the GIL), decoded by tifffile's own
decoder for the page (libjpeg-turbo through imagecodecs, with the page's JPEG tables and colour space, so
pixels are those OpenSlide produces), and kept in a small byte-bounded LRU so the tile row shared by two
patch rows is decoded once.

Only pages tifffile describes as tiled, 8-bit, 3-sample, contiguous JPEG are taken; anything else (NDPI, JPEG
2000, DICOM, odd layouts) returns None from `open_tiff_level` and callers use the generic reader.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import tifffile

from service.errors import CorruptSlideError

JPEG = 7
FAST_COMPRESSIONS = frozenset({JPEG})


class TileCache:
    """Byte-bounded LRU of decoded tiles shared by worker threads; a tile being decoded by one thread is
    waited for (not decoded again) by the others."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self._data: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._pending: dict[tuple[int, int], threading.Event] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[int, int], load) -> np.ndarray:
        while True:
            with self._lock:
                tile = self._data.get(key)
                if tile is not None:
                    self._data.move_to_end(key)
                    self.hits += 1
                    return tile
                event = self._pending.get(key)
                owner = event is None
                if owner:
                    event = self._pending[key] = threading.Event()
                    self.misses += 1
            if not owner:
                event.wait()
                continue  # now cached, or the owner failed and this thread retries
            try:
                tile = load(key)
                with self._lock:
                    if tile.nbytes <= self.max_bytes:
                        self._data[key] = tile
                        self._bytes += tile.nbytes
                        while self._bytes > self.max_bytes and self._data:
                            _, old = self._data.popitem(last=False)
                            self._bytes -= old.nbytes
                return tile
            finally:
                with self._lock:
                    self._pending.pop(key, None)
                event.set()


class TiffLevel:
    """One tiled JPEG TIFF page, read tile by tile without going through tifffile's file handle."""

    def __init__(self, path: Path, page: tifffile.TiffPage) -> None:
        self.path = path
        self.width = int(page.imagewidth)
        self.height = int(page.imagelength)
        self.tile_w = int(page.tilewidth)
        self.tile_h = int(page.tilelength)
        self.tiles_x = -(-self.width // self.tile_w)
        self.tiles_y = -(-self.height // self.tile_h)
        self.offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        self.counts = np.asarray(page.databytecounts, dtype=np.int64)
        self._jpegtables = page.jpegtables
        self._decode = page.decode  # a closure over the page's codec settings; no file access
        self._fd = os.open(path, os.O_RDONLY)

    def decode_tile(self, key: tuple[int, int]) -> np.ndarray:
        """uint8 RGB [tile_h, tile_w, 3] (edge tiles keep the stored padding); missing tiles are white."""
        tx, ty = key
        index = ty * self.tiles_x + tx
        count = int(self.counts[index])
        if count == 0:
            return np.full((self.tile_h, self.tile_w, 3), 255, np.uint8)
        data = os.pread(self._fd, count, int(self.offsets[index]))
        try:
            if len(data) != count:
                raise ValueError(f"file truncated: {len(data)} of {count} bytes")
            arr, _, _ = self._decode(data, index, jpegtables=self._jpegtables)
            return np.ascontiguousarray(arr.reshape(self.tile_h, self.tile_w, -1)[:, :, :3])
        except Exception as exc:  # any codec error means damaged pixels, never a worker crash
            raise CorruptSlideError(
                f"stored tile ({tx}, {ty}) of the {self.width}x{self.height} level cannot be decoded ({exc})",
                slide=self.path.name,
            ) from None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        with contextlib.suppress(OSError):
            self.close()


def _tiled_pages(tif: tifffile.TiffFile):
    """Every page of the file, top-level IFDs and SubIFD pyramid levels alike."""
    seen: set[int] = set()
    for series in tif.series:
        for level in series.levels:
            page = level.keyframe
            if isinstance(page, tifffile.TiffPage) and page.offset not in seen:
                seen.add(page.offset)
                yield page
    for page in tif.pages:
        if isinstance(page, tifffile.TiffPage) and page.offset not in seen:
            seen.add(page.offset)
            yield page


def open_tiff_level(path: str | Path, width: int, height: int) -> TiffLevel | None:
    """The tiled JPEG page of `path` that is exactly `width` x `height`, or None when the fast path does not
    apply (not a TIFF, NDPI, other codec, no such page)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with tifffile.TiffFile(path) as tif:
            if tif.is_ndpi or tif.is_philips:  # NDPI: whole-level JPEGs with restart markers
                return None
            for page in _tiled_pages(tif):
                if (
                    page.is_tiled
                    and int(page.imagewidth) == width
                    and int(page.imagelength) == height
                    and page.compression in FAST_COMPRESSIONS
                    and page.samplesperpixel in (3, 4)
                    and page.bitspersample == 8
                    and page.planarconfig == 1
                    and int(page.imagedepth) == 1
                    and len(page.dataoffsets) == (-(-width // page.tilewidth)) * (-(-height // page.tilelength))
                ):
                    return TiffLevel(path, page)
    except (tifffile.TiffFileError, OSError, ValueError, KeyError):
        return None
    return None


class FastTiffSource:
    """Cuts `size` x `size` level pixels at level coordinates out of cached decoded tiles."""

    def __init__(self, level: TiffLevel, cache_bytes: int = 64 << 20) -> None:
        self.level = level
        self.cache = TileCache(cache_bytes)

    def read(self, lx: int, ly: int, size: int | tuple[int, int], out: np.ndarray | None = None) -> np.ndarray:
        """Level pixels `[ly, ly + h) x [lx, lx + w)` (size = side or (w, h)); outside the level is white."""
        lv = self.level
        w, h = (size, size) if isinstance(size, int) else size
        if out is None:
            out = np.empty((h, w, 3), np.uint8)
        x0, y0, x1, y1 = lx, ly, lx + w, ly + h
        if x0 < 0 or y0 < 0 or x1 > lv.width or y1 > lv.height:
            out[...] = 255  # outside the slide is white, as read_region promises
        cx0, cy0 = max(x0, 0), max(y0, 0)
        cx1, cy1 = min(x1, lv.width), min(y1, lv.height)
        if cx0 >= cx1 or cy0 >= cy1:
            return out
        tw, th = lv.tile_w, lv.tile_h
        for ty in range(cy0 // th, (cy1 - 1) // th + 1):
            ry0, ry1 = max(cy0, ty * th), min(cy1, (ty + 1) * th)
            for tx in range(cx0 // tw, (cx1 - 1) // tw + 1):
                rx0, rx1 = max(cx0, tx * tw), min(cx1, (tx + 1) * tw)
                tile = self.cache.get((tx, ty), lv.decode_tile)
                out[ry0 - y0 : ry1 - y0, rx0 - x0 : rx1 - x0] = tile[
                    ry0 - ty * th : ry1 - ty * th, rx0 - tx * tw : rx1 - tx * tw
                ]
        return out

    def close(self) -> None:
        self.level.close()
