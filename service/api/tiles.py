"""Deep Zoom tiles rendered from a stored slide's pyramid, for the viewer.

Works on the `SlideReader` interface, so every format the service reads (SVS, NDPI, OME-TIFF, DICOM WSI) is
viewable; openslide's `DeepZoomGenerator` only takes OpenSlide objects. Only `read_region` on the pyramid is
ever called, so the label and macro images (patient identity) cannot reach a tile.

Deep Zoom geometry: level `max_level = ceil(log2(max(w, h)))` is level 0 at full size and each level below
halves it; tiles are `TILE` px squares without overlap, cut from the finest pyramid level that is at least as
detailed and area-resized. Open readers and encoded tiles are kept in small LRU caches (tiles are immutable:
a slide's bytes never change under its id).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from service.errors import InvalidParameterError

if TYPE_CHECKING:
    from service.slides.base import SlideReader

TILE = 256
JPEG_QUALITY = 85


@dataclass(frozen=True)
class DeepZoomInfo:
    width: int
    height: int
    max_level: int
    tile_size: int = TILE

    def level_size(self, level: int) -> tuple[int, int]:
        scale = 2 ** (self.max_level - level)
        return max(1, math.ceil(self.width / scale)), max(1, math.ceil(self.height / scale))

    def to_json(self) -> dict:
        return {
            "width": self.width,
            "height": self.height,
            "tileSize": self.tile_size,
            "tileOverlap": 0,
            "minLevel": 0,
            "maxLevel": self.max_level,
            "format": "jpeg",
        }


def deep_zoom_info(reader: SlideReader) -> DeepZoomInfo:
    w, h = (int(v) for v in reader.dimensions)
    return DeepZoomInfo(w, h, max(0, math.ceil(math.log2(max(w, h, 1)))))


def check_tile(info: DeepZoomInfo, level: int, col: int, row: int) -> None:
    """A clear 422 for a level or tile the slide does not have."""
    if not 0 <= level <= info.max_level:
        raise InvalidParameterError(f"Deep Zoom level must be 0-{info.max_level}, got {level}")
    lw, lh = info.level_size(level)
    t = info.tile_size
    if not (0 <= col < math.ceil(lw / t) and 0 <= row < math.ceil(lh / t)):
        raise InvalidParameterError(f"no tile {col}_{row} at Deep Zoom level {level}")


def tile_etag(slide_sha256: str, level: int, col: int, row: int) -> str:
    """A tile's bytes follow from the slide's bytes, the tile's place and this renderer's settings only."""
    return f'"{slide_sha256[:32]}-{level}-{col}-{row}-t{TILE}q{JPEG_QUALITY}"'


#: a tile whose source region is larger than this is cut from the slide's overview instead (see `render_tile`)
DIRECT_READ_PIXELS = 16_000_000
OVERVIEW_SIDE = 2048  # px, longer side of a slide's overview


def render_tile(
    reader: SlideReader,
    info: DeepZoomInfo,
    level: int,
    col: int,
    row: int,
    overview: Callable[[], np.ndarray] | None = None,
) -> np.ndarray:
    """RGB uint8 tile (`TILE` px, smaller at the right and bottom edges).

    A coarse tile of a slide with no level coarse enough (a single-level TIFF) would read the whole level for one
    tile: past the reader's limit that was a 413 on every zoomed-out view and an empty navigator. Such tiles are
    cut from `overview()`, the slide's thumbnail, built once (in bounded chunks) and kept with its reader."""
    check_tile(info, level, col, row)
    lw, lh = info.level_size(level)
    t = info.tile_size
    x0, y0 = col * t, row * t
    tw, th = min(t, lw - x0), min(t, lh - y0)
    scale = float(2 ** (info.max_level - level))  # level-0 px per Deep Zoom px
    downs = list(reader.level_downsamples)
    src = max((i for i, d in enumerate(downs) if d <= scale * 1.01), key=lambda i: downs[i], default=0)
    ds = downs[src]
    loc = (round(x0 * scale), round(y0 * scale))
    w0 = min(round(tw * scale), info.width - loc[0])
    h0 = min(round(th * scale), info.height - loc[1])
    size = (max(1, round(w0 / ds)), max(1, round(h0 / ds)))
    if overview is not None and size[0] * size[1] > DIRECT_READ_PIXELS:
        img = overview()
        sx, sy = img.shape[1] / info.width, img.shape[0] / info.height
        ox0, oy0 = math.floor(loc[0] * sx), math.floor(loc[1] * sy)
        ox1 = max(ox0 + 1, min(img.shape[1], math.ceil((loc[0] + w0) * sx)))
        oy1 = max(oy0 + 1, min(img.shape[0], math.ceil((loc[1] + h0) * sy)))
        region = img[oy0:oy1, ox0:ox1]
    else:
        region = reader.read_region(loc, src, size)
    if region.shape[1] != tw or region.shape[0] != th:
        shrink = region.shape[1] >= tw and region.shape[0] >= th
        region = cv2.resize(region, (tw, th), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return region


def encode_jpeg(rgb: np.ndarray) -> bytes:
    # OpenCV encodes BGR; one cvtColor pass, where NumPy's reversed-channel copy cost more than the encode
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


@dataclass
class _OpenSlide:
    """A cached reader, and how many requests are reading it: an evicted one is closed by its last user."""

    reader: SlideReader
    info: DeepZoomInfo
    stack: ExitStack
    users: int = 0
    evicted: bool = False
    _overview: np.ndarray | None = None
    _overview_lock: threading.Lock = field(default_factory=threading.Lock)

    def overview(self) -> np.ndarray:
        """The slide's thumbnail (longer side `OVERVIEW_SIDE`), made on first use by one request at a time."""
        with self._overview_lock:
            if self._overview is None:
                self._overview = self.reader.thumbnail(OVERVIEW_SIDE)
            return self._overview


class TileCache:
    """Open readers (at most `max_readers`) and encoded tiles (at most `max_bytes`), least recently used out.

    A reader evicted while other requests still read from it is closed when the last of them is done: closing it
    under them made OpenSlide abort the whole gateway (`tiffcache_destroy: assertion failed`) as soon as tiles of
    more than `max_readers` slides were requested at once."""

    def __init__(self, blobs: Any, *, max_readers: int = 8, max_bytes: int = 128 << 20) -> None:
        self.blobs = blobs
        self.max_readers, self.max_bytes = max_readers, max_bytes
        self._readers: OrderedDict[str, _OpenSlide] = OrderedDict()
        self._tiles: OrderedDict[tuple, bytes] = OrderedDict()
        # A slide's Deep Zoom geometry outlives its reader: tile checks need it, and reopening a slide (a download
        # from S3) only to refuse a tile or answer a 304 would cost what the tile cache saves.
        self._infos: OrderedDict[str, DeepZoomInfo] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @contextmanager
    def reading(self, slide_id: str, blob_key: str, mpp_override: float | None) -> Iterator[_OpenSlide]:
        """The slide's cached reader (opened if needed), held open for the block."""
        entry = self._acquire(slide_id, blob_key, mpp_override)
        try:
            yield entry
        finally:
            with self._lock:
                entry.users -= 1
                done = entry.evicted and entry.users == 0
            if done:
                entry.stack.close()

    def _acquire(self, slide_id: str, blob_key: str, mpp_override: float | None) -> _OpenSlide:
        from service.slides.open import open_slide

        with self._lock:
            entry = self._readers.get(slide_id)
            if entry is not None:
                self._readers.move_to_end(slide_id)
                entry.users += 1
                return entry
        stack = ExitStack()
        try:
            path = stack.enter_context(self.blobs.local_copy(blob_key))
            reader = stack.enter_context(open_slide(path, mpp_override=mpp_override))
            info = deep_zoom_info(reader)
        except BaseException:
            stack.close()
            raise
        closing: list[_OpenSlide] = []
        with self._lock:
            entry = self._readers.get(slide_id)
            if entry is not None:  # another request opened it meanwhile
                closing.append(_OpenSlide(reader, info, stack, evicted=True))
            else:
                entry = self._readers[slide_id] = _OpenSlide(reader, info, stack)
                self._infos[slide_id] = info
                self._infos.move_to_end(slide_id)
                while len(self._infos) > 4096:
                    self._infos.popitem(last=False)
            entry.users += 1
            while len(self._readers) > self.max_readers:
                _, old = self._readers.popitem(last=False)
                old.evicted = True
                if old.users == 0:
                    closing.append(old)
        for old in closing:  # outside the lock: closing a slide can take a while
            old.stack.close()
        return entry

    def info(self, slide_id: str, blob_key: str, mpp_override: float | None) -> DeepZoomInfo:
        """The slide's Deep Zoom geometry, without opening it again when it was opened before."""
        with self._lock:
            info = self._infos.get(slide_id)
        if info is None:
            with self.reading(slide_id, blob_key, mpp_override) as entry:
                info = entry.info
        return info

    def tile(self, slide_id: str, blob_key: str, mpp: float | None, level: int, col: int, row: int) -> bytes:
        key = (slide_id, level, col, row)
        with self._lock:
            data = self._tiles.get(key)
            if data is not None:
                self._tiles.move_to_end(key)
                self.hits += 1
                return data
            self.misses += 1
        with self.reading(slide_id, blob_key, mpp) as entry:
            data = encode_jpeg(render_tile(entry.reader, entry.info, level, col, row, entry.overview))
        with self._lock:
            if key not in self._tiles:
                self._tiles[key] = data
                self._bytes += len(data)
            while self._bytes > self.max_bytes and self._tiles:
                _, old = self._tiles.popitem(last=False)
                self._bytes -= len(old)
        return data

    def close(self) -> None:
        """Forget everything; readers still in use are closed by their last user."""
        with self._lock:
            entries = list(self._readers.values())
            self._readers.clear()
            self._infos.clear()
            self._tiles.clear()
            self._bytes = 0
            for entry in entries:
                entry.evicted = True
            idle = [e for e in entries if e.users == 0]
        for entry in idle:
            entry.stack.close()
