"""Fast patch source for TIFF-based slides (Aperio SVS with JPEG or JPEG 2000 tiles, generic tiled TIFF,
OME-TIFF, Hamamatsu NDPI): decode each stored tile once and cut patches out of the decoded tiles.

Why: OpenSlide's `read_region` spends most of each call outside JPEG decoding (region setup, cache
lookups, cairo compositing, RGBA -> RGB), and a 224 px patch straddles about four 256 px stored tiles. Here
the raw tile bytes are read with `os.pread` (thread-safe, releases the GIL), decoded by libjpeg-turbo
(imagecodecs, with the page's JPEG tables and the colour spaces tifffile's own decoder would pass, so pixels
are those OpenSlide produces), and kept in a small byte-bounded LRU so the tile row shared by two
patch rows is decoded once.

JPEG 2000 (Aperio 33005, RGB) tiles go through the same path: tifffile's decoder for those pages is OpenJPEG
(imagecodecs), the library OpenSlide uses, so pixels are identical. One OpenJPEG thread per tile: on 256 px tiles
its thread option was no faster (3x slower on background tiles), and the reader threads already decode tiles in
parallel. Aperio 33003 (YCbCr without the JPEG 2000 colour transform, chroma halved horizontally) is decoded
to its stored components (OpenJPEG through ctypes, `openjpeg.py`, which releases the GIL; Pillow's decoder,
told the stream is sRGB so that it converts nothing, where no libopenjp2 loads) and turned into RGB with
OpenSlide's own tables and nearest chroma upsampling, so pixels are identical to OpenSlide's. The parts of a
batch (all but NDPI) decode their tiles ahead of cutting (`decode_ahead`), so two threads never wait on each
other's tile.

Decoded tiles live in a byte-bounded cache; tiles it evicts that no reader still holds are decoded into again
(JPEG tiles, NDPI blocks, MIRAX images), which saves the page faults of fresh arrays.

NDPI stores each level as one JPEG whose restart markers cut it into intervals (tifffile lists them as "tiles"
of one MCU row: a whole row in the sample, 256 MCUs = 2,048 px in most scanner files). Decoding intervals one
by one costs a libjpeg set-up per interval, so `NdpiLevel` groups a block of intervals into a "super tile" of
about 1024 x 64 px (one interval wide where intervals are wider), joins their entropy-coded data with restart
markers renumbered from 0 and decodes the block with one call, under a JPEG header patched to the block's size.
McuStarts, the tag giving each interval's offset, is checked as OpenSlide checks it (each interval follows its
restart marker) and its 32-bit wrap-arounds past 4 GB are undone.
Each restart interval is an independent entropy-coded unit, so the pixels equal OpenSlide's, which decodes the
same intervals one by one; where chroma is subsampled, blocks never join intervals in that direction (libjpeg's
fancy upsampling would use the neighbouring interval's chroma at the border, OpenSlide repeats the edge).

MIRAX (`.mrxs` + a folder with Slidedat.ini, Index.dat, Data*.dat) stores one JPEG per camera image; where the
images sit on a regular grid (no camera overlap, no position buffer, one image per camera field) `MiraxLevel`
maps each level's images to tiles from Index.dat and decodes them once, as OpenSlide's MIRAX driver would place
them. Scanner files with overlapping camera fields or a position buffer keep the generic path.

Anything else (Philips, DICOM, other codecs, odd layouts) returns None from `open_tiff_level` and callers use the
generic reader.
"""

from __future__ import annotations

import configparser
import contextlib
import io
import os
import struct
import sys
import threading
from collections import OrderedDict
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile
from PIL import Image, features

from service.errors import CorruptSlideError
from service.slides import openjpeg
from service.slides.batchdecode import CHECK_TILES, BatchDecoder
from service.slides.headers import (
    check_size,
    j2k_codestream_size,
    j2k_components,
    jpeg_frame_size,
    jpeg_scan_intact,
    jpeg_segments,
    stream_layout,
)
from service.slides.jpeg import DamagedJpegError, decode_rgb

JPEG = 7
APERIO_J2K_YCBCR = 33003
APERIO_J2K_RGB = 33005
FAST_COMPRESSIONS = frozenset({JPEG, APERIO_J2K_YCBCR, APERIO_J2K_RGB})
NDPI_BLOCK_W = 1024  # target size of an NDPI super tile (level pixels)
# 64 rows: where restart intervals are whole level rows (NDP.scan), a block is the level's width; 256-row
# blocks decoded up to a block of rows beyond each tissue edge and left one reader thread waiting on the
# other's block (A/B on a built 16k NDPI: 64 rows +8-30 % patches/s, 14 % less CPU; the 65-patch sample equal)
NDPI_BLOCK_H = 64


class TileCache:
    """Byte-bounded LRU of decoded tiles shared by worker threads; a tile being decoded by one thread is
    waited for (not decoded again) by the others.

    Evicted tiles that no thread still holds are kept (up to `spare` of them) and handed back by `recycled` as
    decode targets: a fresh 200 KB - 1.5 MB array costs its page faults on first write, which measured 30 % of
    a 256 px JPEG tile's decode time (0.43 vs 0.29 ms a tile)."""

    def __init__(self, max_bytes: int, spare: int = 4) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self.spare = max(0, int(spare))
        self._data: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._pending: dict[tuple[int, int], threading.Event] = {}
        self._free: list[np.ndarray] = []
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.reused = 0

    def recycled(self, shape: tuple[int, ...] | None) -> np.ndarray | None:
        """A spare uint8 array of `shape` to decode into, or None (then the decoder allocates)."""
        if shape is None:
            return None
        with self._lock:
            for i, buf in enumerate(self._free):
                if buf.shape == shape:
                    self.reused += 1
                    return self._free.pop(i)
        return None

    def _evict(self) -> None:
        """Drop least recently used tiles until under budget (lock held). A tile is recycled only when no
        other reference exists: the references a reader takes in `get` are taken under this same lock, so
        the count cannot grow after the check (CPython reference counts)."""
        while self._bytes > self.max_bytes and self._data:
            _, old = self._data.popitem(last=False)
            self._bytes -= old.nbytes
            # 2 = `old` + getrefcount's argument; a view or a reader still copying from it holds more
            if len(self._free) < self.spare and old.base is None and sys.getrefcount(old) == 2:
                self._free.append(old)

    def get(self, key: tuple[int, int], load) -> np.ndarray:
        while True:
            with self._lock:
                tile = self._data.get(key)
                if tile is not None:
                    self._data.move_to_end(key)
                    self.hits += 1
                    return tile
                event = self._pending.get(key)
                if event is None:
                    event = self._claim(key)
                    break
            event.wait()  # now cached, or the owner failed and this thread retries
        return self._fill(key, load, event)

    def ensure(self, key: tuple[int, int], load) -> None:
        """Decode `key` into the cache unless it is cached or another thread is decoding it: never waits, so
        threads that need overlapping tiles decode different ones side by side instead of one waiting."""
        with self._lock:
            if key in self._data or key in self._pending:
                return
            event = self._claim(key)
        self._fill(key, load, event)

    def busy(self, keys) -> bool:
        """Whether any of `keys` is being decoded by some thread and not cached yet: a read needing it would
        wait."""
        with self._lock:
            return any(k in self._pending and k not in self._data for k in keys)

    def claim_free(self, keys) -> list[tuple[tuple[int, int], threading.Event]]:
        """Claim every one of `keys` that is neither cached nor being decoded, for `fill_claimed`; never
        waits."""
        with self._lock:
            return [(k, self._claim(k)) for k in keys if k not in self._data and k not in self._pending]

    def fill_claimed(self, claims: list[tuple[tuple[int, int], threading.Event]], load) -> None:
        """Fill claimed keys in turn; where one fails, the rest are released (readers waiting on them decode
        them themselves) and the error goes up."""
        for i, (key, event) in enumerate(claims):
            try:
                self._fill(key, load, event)
            except BaseException:
                self.release(claims[i + 1 :])
                raise

    def release(self, claims: list[tuple[tuple[int, int], threading.Event]]) -> None:
        """Give claimed keys up undecoded: readers waiting on them wake and decode them themselves."""
        with self._lock:
            for k, _ in claims:
                self._pending.pop(k, None)
        for _, e in claims:
            e.set()

    def _claim(self, key: tuple[int, int]) -> threading.Event:
        """Mark `key` as being decoded by this thread (lock held)."""
        event = self._pending[key] = threading.Event()
        self.misses += 1
        return event

    def _fill(self, key: tuple[int, int], load, event: threading.Event) -> np.ndarray:
        try:
            tile = load(key)
            with self._lock:
                if tile.nbytes <= self.max_bytes:
                    self._data[key] = tile
                    self._bytes += tile.nbytes
                    self._evict()
            return tile
        finally:
            with self._lock:
                self._pending.pop(key, None)
            event.set()


def _jpeg_into(data: bytes, out: np.ndarray | None, **args) -> np.ndarray:
    """imagecodecs' libjpeg-turbo decode into `out` where it fits, else into a new array, whose error then names
    the problem: for colour handling a complete stream cannot carry (`complete_jpeg` None). Not strict: damaged
    data decodes to wrong pixels, where `jpeg.decode_rgb` refuses it."""
    if out is not None:
        with contextlib.suppress(Exception):
            return imagecodecs.jpeg8_decode(data, out=out, **args)
    return imagecodecs.jpeg8_decode(data, **args)


# Adobe APP14 with transform 0: the components are R, G, B (libjpeg reads no JFIF marker first)
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"


def complete_jpeg(data: bytes, tables: bytes | None, args: dict) -> bytes | None:
    """A TIFF JPEG tile as a stream any decoder reads as tifffile's libjpeg call does: the page's JPEGTables
    merged in, and where tifffile names the colour space RGB (Aperio: RGB-coded, no JFIF marker) an Adobe
    segment saying so, placed just before the frame so that it is the last one read. None for colour
    handling a stream cannot carry; ValueError for a tile that is not baseline JPEG."""
    if args.get("outcolorspace") != 2 or args.get("colorspace") not in (None, 2):
        return None
    if tables:
        data = bytes(tables[:-2]) + data[2:]  # tables: SOI, DQT/DHT, EOI; tile: SOI, frame, scan, EOI
    if args.get("colorspace") == 2:
        at = _sof_offset(data)
        data = data[:at] + _ADOBE_RGB + data[at:]
    return data


def _c_round(x: np.ndarray) -> np.ndarray:
    """C's round(): halves away from zero (numpy rounds them to even)."""
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


_CHROMA = np.arange(256, dtype=np.float64) - 128
# OpenSlide's YCbCr -> RGB tables for Aperio 33003 (the JFIF matrix; G in 16-bit fixed point, rounding folded in)
_R_CR = _c_round(1.402 * _CHROMA).astype(np.int16)
_G_CB = _c_round(65536 * (0.5 - 0.34414 * _CHROMA)).astype(np.int32)
_G_CR = _c_round(65536 * -0.71414 * _CHROMA).astype(np.int32)
_B_CB = _c_round(1.772 * _CHROMA).astype(np.int16)


def _srgb_jp2(codestream: bytes, width: int, height: int) -> bytes:
    """`codestream` in a minimal JP2 container that declares sRGB: decoders then hand back the three
    components as stored (chroma repeated to full width) instead of applying their own YCbCr conversion."""

    def box(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", 8 + len(payload)) + kind + payload

    ihdr = box(b"ihdr", struct.pack(">IIHBBBB", height, width, 3, 7, 7, 0, 0))  # 3 x 8-bit unsigned
    colr = box(b"colr", struct.pack(">BBBI", 1, 0, 0, 16))  # enumerated colour space 16 = sRGB
    head = b"\x00\x00\x00\x0cjP  \r\n\x87\n" + box(b"ftyp", b"jp2 \x00\x00\x00\x00jp2 ")
    return head + box(b"jp2h", ihdr + colr) + box(b"jp2c", codestream)


def decode_aperio_ycbcr(codestream: bytes, width: int, height: int, reduce: int = 0) -> np.ndarray:
    """uint8 RGB of one Aperio 33003 tile (J2K, YCbCr without the JPEG 2000 colour transform, chroma usually
    halved horizontally) at 1 / 2**reduce resolution, with the pixels OpenSlide produces: its nearest chroma
    upsampling and its tables. The stored components come from OpenJPEG through ctypes (`openjpeg`, no GIL
    held while decoding); where no libopenjp2 loads, from Pillow's OpenJPEG given an sRGB container (it then
    returns the components untouched, but holds the GIL). imagecodecs converts subsampled YCbCr itself, with
    other rounding, so it is not used here."""
    f = 1 << reduce
    shape = (-(-height // f), -(-width // f))
    if openjpeg.available():
        planes = openjpeg.decode_components(codestream, reduce, expect_size=(width, height))
        if len(planes) != 3:
            raise ValueError(f"tile has {len(planes)} components, not 3")
        luma = planes[0]
        if luma.shape != shape:
            raise ValueError(f"tile decodes to {luma.shape}, not {shape}")
        return _ycbcr_to_rgb(luma, planes[1], planes[2])
    with Image.open(io.BytesIO(_srgb_jp2(codestream, width, height))) as im:
        im.reduce = reduce
        im.load()
        ycc = np.asarray(im)
    if ycc.shape != (*shape, 3):
        raise ValueError(f"tile decodes to {ycc.shape}, not {(*shape, 3)}")
    return _ycbcr_to_rgb(ycc[..., 0], ycc[..., 1], ycc[..., 2])


def _upsample(plane: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour upsampling of a subsampled plane to `shape` (OpenSlide repeats chroma samples)."""
    fy, fx = -(-shape[0] // plane.shape[0]), -(-shape[1] // plane.shape[1])
    if fx > 1:
        plane = np.repeat(plane, fx, axis=1)
    if fy > 1:
        plane = np.repeat(plane, fy, axis=0)
    return plane[: shape[0], : shape[1]]


def _ycbcr_to_rgb(y: np.ndarray, cb: np.ndarray, cr: np.ndarray) -> np.ndarray:
    """OpenSlide's Aperio 33003 YCbCr -> RGB (its tables, C rounding) of stored planes; the chroma terms are
    looked up at the chroma planes' own (subsampled) size, then repeated to the luma's."""
    shape = y.shape
    if cb.shape != cr.shape or cb.shape[0] > shape[0] or cb.shape[1] > shape[1]:
        raise ValueError(f"chroma planes {cb.shape} / {cr.shape} do not fit luma {shape}")
    luma = y.astype(np.int16)
    out = np.empty((*shape, 3), np.uint8)
    terms = (_R_CR[cr], ((_G_CB[cb] + _G_CR[cr]) >> 16).astype(np.int16), _B_CB[cb])
    for channel, term in enumerate(terms):
        np.clip(luma + _upsample(term, shape), 0, 255, out=out[..., channel], casting="unsafe")
    return out


class TiffLevel:
    """One tiled JPEG / JPEG 2000 TIFF page, read tile by tile without going through tifffile's file handle."""

    kind = "tiff"

    def __init__(self, path: Path, page: tifffile.TiffPage) -> None:
        self.codec = "jpeg" if page.compression == JPEG else "jpeg2000"
        self._ycbcr = page.compression == APERIO_J2K_YCBCR
        self.planar = self._ycbcr  # a batch decoder hands back stored planes, converted by `from_planes`
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
        self._jpeg_args: dict | None = None  # libjpeg-turbo straight into a given buffer (3-sample JPEG)
        colorspace = getattr(tifffile.tifffile, "jpeg_decode_colorspace", None)
        if page.compression == JPEG and page.samplesperpixel == 3 and not page.extrasamples and colorspace:
            # the colour spaces tifffile's own decoder passes, so the pixels are the same
            cs, out_cs = colorspace(page.photometric, page.planarconfig, page.extrasamples, page.is_jfif)
            self._jpeg_args = {"tables": page.jpegtables, "colorspace": cs, "outcolorspace": out_cs}
        self._fd = os.open(path, os.O_RDONLY)

    def tile_shape(self, key: tuple[int, int]) -> tuple[int, int, int] | None:
        """Shape of `decode_tile(key)` where it can decode into a given buffer, else None."""
        return (self.tile_h, self.tile_w, 3) if self._jpeg_args is not None else None

    def decode_tile(self, key: tuple[int, int], out: np.ndarray | None = None) -> np.ndarray:
        """uint8 RGB [tile_h, tile_w, 3] (edge tiles keep the stored padding), into `out` when given and the
        codec allows; missing tiles are white."""
        tx, ty = key
        index = ty * self.tiles_x + tx
        if int(self.counts[index]) == 0:
            return np.full((self.tile_h, self.tile_w, 3), 255, np.uint8)
        try:
            data = self._stored(index)
            if self._jpeg_args is not None:
                try:
                    stream = complete_jpeg(data, self._jpegtables, self._jpeg_args)
                    return decode_rgb(stream, out) if stream is not None else _jpeg_into(data, out, **self._jpeg_args)
                except DamagedJpegError:
                    raise
                except Exception:  # not baseline 8-bit JPEG after all: tifffile's decoder below names the error
                    pass
            if self._ycbcr:
                return decode_aperio_ycbcr(data, self.tile_w, self.tile_h)
            arr, _, _ = self._decode(data, index, jpegtables=self._jpegtables)
            return np.ascontiguousarray(arr.reshape(self.tile_h, self.tile_w, -1)[:, :, :3])
        except Exception as exc:  # any codec error means damaged pixels, never a worker crash
            raise CorruptSlideError(
                f"stored tile ({tx}, {ty}) of the {self.width}x{self.height} level cannot be decoded ({exc})",
                slide=self.path.name,
            ) from None

    def stream(self, key: tuple[int, int]) -> bytes | None:
        """Tile `key` as one complete codestream for a batch decoder (`batchdecode`; Aperio 33003's to be
        decoded to planes, `planar`), or None where only `decode_tile` gives its pixels: no stored tile, a JPEG
        that is not baseline 3-sample RGB, a tile whose bytes or header are wrong (`decode_tile` then names the
        problem)."""
        tx, ty = key
        index = ty * self.tiles_x + tx
        if int(self.counts[index]) == 0 or (self.codec == "jpeg" and self._jpeg_args is None):
            return None
        try:
            data = self._stored(index)
            if self.codec == "jpeg2000":
                return data
            return complete_jpeg(data, self._jpegtables, self._jpeg_args)
        except ValueError:
            return None

    def from_planes(self, planes: np.ndarray, stream: bytes) -> np.ndarray | None:
        """RGB of an Aperio 33003 tile from a batch decoder's stored planes ([3, H, W] YCbCr, each chroma
        component at its own size in its plane's top-left corner), with the CPU path's conversion (OpenSlide's
        tables); None where the planes do not fit the tile."""
        if planes.shape != (3, self.tile_h, self.tile_w):
            return None
        try:
            comps = j2k_components(stream)
        except ValueError:
            return None
        if len(comps) != 3 or comps[1][1:] != comps[2][1:] or comps[0][1:] != (1, 1):
            return None
        dx, dy = comps[1][1:]
        ch, cw = -(-self.tile_h // dy), -(-self.tile_w // dx)
        return _ycbcr_to_rgb(planes[0], planes[1, :ch, :cw], planes[2, :ch, :cw])

    def _stored(self, index: int) -> bytes:
        """The stored bytes of tile `index` (non-empty), whose header must declare the TIFF tile's size: checked
        before any decoder allocates for it (`headers`; one hostile tile header made the decoders take 10-24 GB).
        ValueError when truncated or mis-sized."""
        count = int(self.counts[index])
        data = os.pread(self._fd, count, int(self.offsets[index]))
        if len(data) != count:
            raise ValueError(f"file truncated: {len(data)} of {count} bytes")
        if self.codec == "jpeg2000":
            check_size(j2k_codestream_size(data), (self.tile_w, self.tile_h), "JPEG 2000 tile")
        else:  # a JPEG tile is a stream of its own (SOI, frame, scan), its tables perhaps in JPEGTables
            check_size(jpeg_frame_size(data), (self.tile_w, self.tile_h), "JPEG tile")
        return data

    def decode_reduced(self, key: tuple[int, int], reduce: int) -> np.ndarray:
        """uint8 RGB of JPEG 2000 tile `key` at 1 / 2**reduce of its resolution, [ceil(tile_h / f),
        ceil(tile_w / f), 3]: OpenJPEG (Pillow's `reduce`) stops the inverse wavelet transform early and skips
        the finer resolutions' code-blocks, so a 16x smaller tile costs ~1/15 of a full decode. The pixels are
        the wavelet low-pass band, not an area average of the full tile. Missing tiles are white."""
        tx, ty = key
        f = 1 << reduce
        shape = (-(-self.tile_h // f), -(-self.tile_w // f), 3)
        index = ty * self.tiles_x + tx
        if int(self.counts[index]) == 0:
            return np.full(shape, 255, np.uint8)
        if self.codec == "jpeg":
            return self._decode_jpeg_scaled(key, shape, f)
        try:
            data = self._stored(index)
            if self._ycbcr:
                arr = decode_aperio_ycbcr(data, self.tile_w, self.tile_h, reduce)
            elif openjpeg.available():
                planes = openjpeg.decode_components(data, reduce, expect_size=(self.tile_w, self.tile_h))
                arr = np.stack(planes[:3] if len(planes) >= 3 else planes * 3, axis=-1)
            else:
                with Image.open(io.BytesIO(data)) as im:
                    im.reduce = reduce
                    im.load()
                    arr = np.asarray(im.convert("RGB") if im.mode != "RGB" else im)
            if arr.shape != shape:
                raise ValueError(f"tile decodes to {arr.shape}, not {shape}")
        except Exception as exc:  # damaged data, or fewer wavelet levels than asked for
            raise CorruptSlideError(
                f"stored tile ({tx}, {ty}) of the {self.width}x{self.height} level cannot be decoded at 1/{f} "
                f"resolution ({exc})",
                slide=self.path.name,
            ) from None
        return arr

    def _decode_jpeg_scaled(self, key: tuple[int, int], shape: tuple[int, int, int], f: int) -> np.ndarray:
        """A JPEG tile decoded at 1/f (f = 2, 4 or 8) by libjpeg-turbo's DCT scaling: the IDCT of each 8x8 block
        is computed at the smaller size (at 1/8 only its mean, the DC term), so the whole-level mask read of a
        slide without a pyramid skips most of the work. ValueError where the tile has no complete stream."""
        import simplejpeg

        stream = self.stream(key)
        if stream is None:
            raise ValueError("this JPEG tile has no complete stream to scale")
        try:
            arr = simplejpeg.decode_jpeg(stream, colorspace="RGB", min_height=shape[0], min_width=shape[1], strict=True)
        except ValueError as exc:
            raise CorruptSlideError(
                f"stored tile {key} of the {self.width}x{self.height} level cannot be decoded at 1/{f} ({exc})",
                slide=self.path.name,
            ) from None
        if arr.shape != shape:
            raise ValueError(f"tile decodes to {arr.shape} at 1/{f}, not {shape}")
        return arr

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        with contextlib.suppress(OSError):
            self.close()


def read_level_reduced(level: TiffLevel, reduce: int) -> np.ndarray:
    """The whole JPEG 2000 `level` at 1 / 2**reduce resolution, [ceil(height / f), ceil(width / f), 3], assembled
    from reduced-resolution tile decodes (`TiffLevel.decode_reduced`); tile sides must be multiples of 2**reduce
    so the tiles land on whole pixels (ValueError otherwise)."""
    f = 1 << reduce
    if level.codec not in ("jpeg2000", "jpeg") or level.tile_w % f or level.tile_h % f:
        raise ValueError(f"level with {level.tile_w}x{level.tile_h} {level.codec} tiles cannot be read at 1/{f}")
    h, w = -(-level.height // f), -(-level.width // f)
    tw, th = level.tile_w // f, level.tile_h // f
    out = np.empty((h, w, 3), np.uint8)
    for ty in range(level.tiles_y):
        for tx in range(level.tiles_x):
            y0, x0 = ty * th, tx * tw
            tile = level.decode_reduced((tx, ty), reduce)
            out[y0 : y0 + th, x0 : x0 + tw] = tile[: h - y0, : w - x0]
    return out


MAX_J2K_REDUCE = 5  # wavelet resolutions skipped at most (Aperio codes 5 decomposition levels)
MAX_JPEG_REDUCE = 3  # libjpeg's DCT scaling goes down to 1/8
MAX_REDUCED_PIXELS = 64_000_000  # a reduced whole-level read is refused above this (callers read in chunks)


def reduced_j2k_image(path: str | Path, width: int, height: int, shrink: float) -> np.ndarray | None:
    """`reduced_level_image` of the `width` x `height` level of `path`, or None where it is not a tiled JPEG
    2000 or JPEG level. JPEG levels (the thumbnails' and the overview's only: a grid's tissue mask keeps its area
    average where a level fits in one read) are decoded by DCT scaling, at most 1/8."""
    level = open_tiff_level(path, width, height)
    if level is None:
        return None
    try:
        return reduced_level_image(level, shrink, jpeg=True)
    finally:
        level.close()


def reduced_level_image(
    level: TiffLevel | NdpiLevel | MiraxLevel, shrink: float, *, jpeg: bool = False
) -> np.ndarray | None:
    """A JPEG 2000 `level` decoded straight at the coarsest power-of-two resolution not below `shrink` (output
    px per level px; downsamples within 1 % of a power of two count, for levels like 2.0005), or None where
    that does not apply: not JPEG 2000, `shrink` above 1/2, tile sides not divisible, too many pixels, or fewer
    wavelet levels than asked (callers then decode in full, which also names real damage). Its pixels are the
    wavelet low-pass band, not an area average."""
    if not isinstance(level, TiffLevel) or level.codec not in (("jpeg2000", "jpeg") if jpeg else ("jpeg2000",)):
        return None
    most = MAX_J2K_REDUCE if level.codec == "jpeg2000" else MAX_JPEG_REDUCE
    reduce = 0
    while (
        reduce < most
        and (1 << (reduce + 1)) * shrink <= 1.01
        and level.tile_w % (2 << reduce) == 0
        and level.tile_h % (2 << reduce) == 0
    ):
        reduce += 1
    f = 1 << reduce
    if reduce == 0 or -(-level.width // f) * -(-level.height // f) > MAX_REDUCED_PIXELS:
        return None
    try:
        return read_level_reduced(level, reduce)
    except (CorruptSlideError, ValueError):
        return None


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


def _fast_tiled_page(page: tifffile.TiffPage, width: int, height: int) -> bool:
    return bool(
        page.is_tiled
        and int(page.imagewidth) == width
        and int(page.imagelength) == height
        and page.compression in FAST_COMPRESSIONS
        and (page.compression != APERIO_J2K_YCBCR or features.check("jpg_2000"))  # Pillow built with OpenJPEG
        # three samples, RGB or YCbCr: a CMYK (separated) JPEG TIFF was cut as if its C, M, Y were R, G, B, and
        # an alpha sample would be dropped where OpenSlide composites it; both keep the generic path
        and page.samplesperpixel == 3
        and page.photometric in (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR)
        and page.bitspersample == 8
        and page.planarconfig == 1
        and int(page.imagedepth) == 1
        and len(page.dataoffsets) == (-(-width // page.tilewidth)) * (-(-height // page.tilelength))
    )


def open_tiff_level(path: str | Path, width: int, height: int) -> TiffLevel | NdpiLevel | MiraxLevel | None:
    """The level of `path` that is exactly `width` x `height` and that the fast path can cut (a tiled JPEG or
    Aperio JPEG 2000 page, an NDPI level with restart markers, a regular MIRAX level), or None (other format or
    codec, no such level)."""
    path = Path(path)
    if not path.is_file():
        return None
    if path.suffix.lower() == ".mrxs":
        try:
            return MiraxLevel.open(path, width, height)
        except (OSError, ValueError, KeyError, struct.error, configparser.Error):
            return None
    try:
        with tifffile.TiffFile(path) as tif:
            if tif.is_philips:
                return None
            if tif.is_ndpi:
                for page in tif.pages:
                    if isinstance(page, tifffile.TiffPage) and NdpiLevel.fits(page, width, height):
                        return NdpiLevel(path, page)
                return None
            for page in _tiled_pages(tif):
                if _fast_tiled_page(page, width, height):
                    return TiffLevel(path, page)
    except (tifffile.TiffFileError, OSError, ValueError, KeyError, IndexError, struct.error):
        return None
    return None


def _sof_offset(header: bytes) -> int:
    """Offset of the baseline SOF0 marker segment in a JPEG header (ValueError when absent)."""
    for marker, i in jpeg_segments(header):
        if marker == 0xC0:
            return i
        if marker in (0xC1, 0xC2, 0xC3, 0xDA):
            break  # progressive/lossless or no frame before the scan: not for this path
    raise ValueError("no baseline SOF0 marker in the JPEG header")


def ndpi_interval_spans(offsets, counts) -> tuple[np.ndarray, np.ndarray]:
    """(file offset, byte count) of each restart interval of an NDPI level, from tifffile's McuStarts-based
    offsets and counts, with 32-bit wrap-arounds undone.

    NDPI keeps McuStarts as 32-bit values plus a McuStartsHighBytes tag, and scanner files past 4 GB exist
    whose high bytes stay 0 where the low ones wrap (ome/bioformats#4082): the offsets then drop by about
    2^32 mid-level. Intervals follow each other in the strip, so every drop is such a wrap; the strip's end
    (the last offset plus the last count) does not depend on McuStarts. Whatever is still inconsistent (a
    damaged tag) is caught where a block is read: each interval must follow its restart marker."""
    off = np.asarray(offsets, dtype=np.int64)
    end = int(off[-1]) + int(np.asarray(counts, dtype=np.int64)[-1])
    off = off + (np.cumsum(np.diff(off, prepend=off[0]) < 0) << 32)
    return off, np.diff(off, append=end)


class NdpiLevel:
    """One NDPI level read in blocks of restart intervals ("super tiles"), each decoded with one libjpeg call."""

    kind = "ndpi"
    codec = "jpeg"
    planar = False

    @staticmethod
    def fits(page: tifffile.TiffPage, width: int, height: int) -> bool:
        if not (
            page.is_tiled
            and page.jpegheader is not None
            and int(page.imagewidth) == width
            and int(page.imagelength) == height
            and page.compression == JPEG
            and page.bitspersample == 8
            and page.samplesperpixel in (1, 3)
        ):
            return False
        cols = -(-width // page.tilewidth)
        return len(page.dataoffsets) == cols * (-(-height // page.tilelength))

    def __init__(self, path: Path, page: tifffile.TiffPage) -> None:
        self.path = path
        self.width = int(page.imagewidth)
        self.height = int(page.imagelength)
        self.iw, self.ih = int(page.tilewidth), int(page.tilelength)  # one restart interval
        self.cols = -(-self.width // self.iw)
        self.rows = -(-self.height // self.ih)
        self._header = bytes(page.jpegheader)
        self._sof = _sof_offset(self._header)
        # chroma subsampled across a block's interval borders would be upsampled from the neighbouring
        # interval's chroma, where OpenSlide, decoding interval by interval, repeats the edge (4:2:2 differs by
        # up to 18 levels there): blocks then never join intervals in that direction
        ncomp = self._header[self._sof + 9]
        factors = self._header[self._sof + 11 : self._sof + 10 + 3 * ncomp : 3]
        across, down = max(f >> 4 for f in factors), max(f & 15 for f in factors)
        self.gx = 1 if across > 1 else max(1, min(self.cols, NDPI_BLOCK_W // self.iw))
        self.gy = 1 if down > 1 else max(1, NDPI_BLOCK_H // self.ih)
        self.tile_w, self.tile_h = self.gx * self.iw, self.gy * self.ih
        self.tiles_x = -(-self.cols // self.gx)
        self.tiles_y = -(-self.rows // self.gy)
        self.offsets, self.counts = ndpi_interval_spans(page.dataoffsets, page.databytecounts)
        self._rgb = page.samplesperpixel == 3
        self._fd = os.open(path, os.O_RDONLY)

    def _block(self, key: tuple[int, int]) -> tuple[int, int, int, int]:
        """Interval columns [c0, c1) and rows [r0, r1) of super tile `key`."""
        c0, r0 = key[0] * self.gx, key[1] * self.gy
        return c0, min(c0 + self.gx, self.cols), r0, min(r0 + self.gy, self.rows)

    def tile_shape(self, key: tuple[int, int]) -> tuple[int, int, int] | None:
        """Shape of `decode_tile(key)` for RGB levels (they can decode into a given buffer), else None."""
        c0, c1, r0, r1 = self._block(key)
        return ((r1 - r0) * self.ih, (c1 - c0) * self.iw, 3) if self._rgb else None

    def _block_header(self, w: int, h: int) -> bytes:
        """The level's JPEG header with the frame size set to one block (SOF0: length, precision, H, W)."""
        o = self._sof + 5
        return self._header[:o] + struct.pack(">HH", h, w) + self._header[o + 4 :]

    def _block_data(self, c0: int, c1: int, r0: int, r1: int) -> bytes:
        """Entropy-coded data of intervals [c0, c1) x [r0, r1), restart markers renumbered from RST0.

        Every interval but the level's first must start just after the restart marker that precedes it in the
        scan (RST0-7 in turn), as OpenSlide checks before trusting McuStarts; an interval that does not means
        the tag is damaged, and decoding from there would give wrong pixels without any error."""
        parts: list[bytes] = []
        n = 0
        for r in range(r0, r1):
            a, b = r * self.cols + c0, r * self.cols + c1 - 1
            start, end = int(self.offsets[a]) - (2 if a else 0), int(self.offsets[b] + self.counts[b])
            if not 0 <= start < end:
                raise ValueError(f"McuStarts of restart intervals {a}-{b} are out of order")
            raw = os.pread(self._fd, end - start, start)
            if len(raw) != end - start:
                raise ValueError(
                    f"restart intervals {a}-{b} end at byte {end} of a {os.fstat(self._fd).st_size} byte file "
                    "(McuStarts damaged, or the file truncated)"
                )
            for i in range(a, b + 1):
                at = int(self.offsets[i]) - start
                if i and (at < 2 or raw[at - 2] != 0xFF or raw[at - 1] != 0xD0 + (i - 1) % 8):
                    raise ValueError(f"restart interval {i} does not follow marker RST{(i - 1) % 8} (McuStarts)")
                seg = raw[at : at + int(self.counts[i])]
                if len(seg) >= 2 and seg[-2] == 0xFF and (0xD0 <= seg[-1] <= 0xD7 or seg[-1] == 0xD9):
                    seg = seg[:-2]  # the interval's own trailing marker
                if n:
                    parts.append(bytes((0xFF, 0xD0 + (n - 1) % 8)))
                parts.append(seg)
                n += 1
        parts.append(b"\xff\xd9")
        return b"".join(parts)

    def _block_stream(self, key: tuple[int, int]) -> bytes:
        c0, c1, r0, r1 = self._block(key)
        return self._block_header((c1 - c0) * self.iw, (r1 - r0) * self.ih) + self._block_data(c0, c1, r0, r1)

    def stream(self, key: tuple[int, int]) -> bytes | None:
        """Super tile `key` as one JPEG for a batch decoder; None for grey levels and damaged blocks (then
        `decode_tile` decodes or names the problem)."""
        if not self._rgb:
            return None
        try:
            return self._block_stream(key)
        except ValueError:
            return None

    def decode_tile(self, key: tuple[int, int], out: np.ndarray | None = None) -> np.ndarray:
        """uint8 RGB of super tile `key` (edge blocks are smaller, or padded to whole intervals), into `out`
        when given."""
        tx, ty = key
        try:
            arr = decode_rgb(self._block_stream(key), out)
        except Exception as exc:  # any codec error means damaged pixels, never a worker crash
            raise CorruptSlideError(
                f"NDPI block ({tx}, {ty}) of the {self.width}x{self.height} level cannot be decoded ({exc})",
                slide=self.path.name,
            ) from None
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        return arr[:, :, :3] if arr.shape[2] != 3 else arr

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        with contextlib.suppress(OSError):
            self.close()


class MiraxLevel:
    """One zoom level of a MIRAX slide whose camera images form a regular grid, one JPEG per tile."""

    kind = "mrxs"
    codec = "jpeg"
    planar = False

    @classmethod
    def open(cls, path: Path, width: int, height: int) -> MiraxLevel | None:
        folder = path.with_suffix("")
        ini = configparser.ConfigParser(interpolation=None, strict=False)
        ini.optionxform = str  # MIRAX keys are case-sensitive
        ini.read_string((folder / "Slidedat.ini").read_text(encoding="utf-8-sig", errors="replace"))
        gen, hier = ini["GENERAL"], ini["HIERARCHICAL"]
        if int(gen.get("CameraImageDivisionsPerSide", "1")) != 1 or hier.get("HIER_0_NAME") != "Slide zoom level":
            return None
        nonhier = [hier.get(f"NONHIER_{i}_NAME", "") for i in range(int(hier.get("NONHIER_COUNT", "0")))]
        if "VIMSLIDE_POSITION_BUFFER" in nonhier or "StitchingIntensityLayer" in nonhier:
            return None  # camera positions are not a plain grid
        nx, ny = int(gen["IMAGENUMBER_X"]), int(gen["IMAGENUMBER_Y"])
        sections = [ini[hier[f"HIER_0_VAL_{i}_SECTION"]] for i in range(int(hier["HIER_0_COUNT"]))]
        if any(float(sec["OVERLAP_X"]) or float(sec["OVERLAP_Y"]) for sec in sections):
            return None
        iw, ih = int(sections[0]["DIGITIZER_WIDTH"]), int(sections[0]["DIGITIZER_HEIGHT"])
        exponent = 0
        for z, sec in enumerate(sections):
            exponent += int(sec["IMAGE_CONCAT_FACTOR"])
            concat = 1 << exponent
            same_size = (int(sec["DIGITIZER_WIDTH"]), int(sec["DIGITIZER_HEIGHT"])) == (iw, ih)
            if (nx * iw // concat, ny * ih // concat) == (width, height) and same_size:
                if sec["IMAGE_FORMAT"] != "JPEG":
                    return None
                files = [folder / ini["DATAFILE"][f"FILE_{i}"] for i in range(int(ini["DATAFILE"]["FILE_COUNT"]))]
                images = _mirax_images(folder / hier["INDEXFILE"], gen["SLIDE_ID"], z)
                return cls(path, width, height, iw, ih, nx, concat, images, files)
        return None

    def __init__(
        self,
        path: Path,
        width: int,
        height: int,
        image_w: int,
        image_h: int,
        images_across: int,
        concat: int,
        images: list[tuple[int, int, int, int]],
        files: list[Path],
    ) -> None:
        self.path = path
        self.width, self.height = width, height
        self.tile_w, self.tile_h = image_w, image_h
        self.tiles_x = -(-width // image_w)
        self.tiles_y = -(-height // image_h)
        self.images: dict[tuple[int, int], tuple[int, int, int]] = {}
        for image_index, offset, length, fileno in images:
            x, y = image_index % images_across, image_index // images_across
            if x % concat or y % concat or not 0 <= fileno < len(files):
                raise ValueError(f"image {image_index} does not fit the level's grid")
            self.images[(x // concat, y // concat)] = (fileno, offset, length)
        self._fds = [os.open(f, os.O_RDONLY) for f in files]

    def tile_shape(self, key: tuple[int, int]) -> tuple[int, int, int]:
        return (self.tile_h, self.tile_w, 3)

    def _image(self, entry: tuple[int, int, int]) -> bytes:
        """The stored JPEG of one camera image, its size checked against the level's (ValueError)."""
        fileno, offset, length = entry
        data = os.pread(self._fds[fileno], length, offset)
        if len(data) != length:
            raise ValueError(f"data file truncated: {len(data)} of {length} bytes")
        check_size(jpeg_frame_size(data), (self.tile_w, self.tile_h), "camera image")
        return data

    def stream(self, key: tuple[int, int]) -> bytes | None:
        """The camera image at `key` for a batch decoder; None where there is none or it is damaged."""
        entry = self.images.get(key)
        if entry is None:
            return None
        try:
            return self._image(entry)
        except ValueError:
            return None

    def decode_tile(self, key: tuple[int, int], out: np.ndarray | None = None) -> np.ndarray:
        """uint8 RGB of the camera image at tile `key`, into `out` when given; tiles without an image are
        white, as read_region's transparent pixels become."""
        entry = self.images.get(key)
        if entry is None:
            return np.full((self.tile_h, self.tile_w, 3), 255, np.uint8)
        try:
            arr = decode_rgb(self._image(entry), out)
        except Exception as exc:  # any codec error means damaged pixels, never a worker crash
            raise CorruptSlideError(
                f"MIRAX image {key} of the {self.width}x{self.height} level cannot be decoded ({exc})",
                slide=self.path.name,
            ) from None
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        if arr.shape[:2] != (self.tile_h, self.tile_w):
            raise CorruptSlideError(
                f"MIRAX image {key} is {arr.shape[1]}x{arr.shape[0]} px, not {self.tile_w}x{self.tile_h}",
                slide=self.path.name,
            )
        return arr if arr.shape[2] == 3 else arr[:, :, :3]  # no view where none is needed: it can be recycled

    def close(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []

    def __del__(self) -> None:
        self.close()


def _mirax_images(index: Path, slide_id: str, zoom: int) -> list[tuple[int, int, int, int]]:
    """(image index, offset, length, file number) of every image of zoom level `zoom` in Index.dat: a
    pointer table after the version and slide id, one entry per level, each leading to a chain of pages of
    16-byte records."""
    raw = index.read_bytes()
    head = b"01.02" + slide_id.encode()
    if not raw.startswith(head):
        raise ValueError("Index.dat does not belong to this slide")

    def i32(at: int) -> int:
        return struct.unpack_from("<i", raw, at)[0]

    level = i32(i32(len(head)) + 4 * zoom)
    if i32(level) != 0:
        raise ValueError("unexpected Index.dat level header")
    page, out = i32(level + 4), []
    for _ in range(1 << 20):  # a chain of pages; bounded so a looping chain cannot hang
        count, nxt = i32(page), i32(page + 4)
        if count < 0 or page + 8 + 16 * count > len(raw):
            raise ValueError("Index.dat page out of bounds")
        records = struct.unpack_from(f"<{4 * count}i", raw, page + 8)  # once a page: per record was O(count²)
        out.extend(records[i : i + 4] for i in range(0, 4 * count, 4))
        if nxt == 0:
            return [tuple(r) for r in out]
        page = nxt
    raise ValueError("Index.dat page chain does not end")


def _tile_or_raise(tile: np.ndarray | CorruptSlideError) -> np.ndarray:
    """A tile from `FastTiffSource._decode_batch`, whose damaged tiles come back as their error."""
    if isinstance(tile, Exception):
        raise tile
    return tile


class FastTiffSource:
    """Cuts `size` x `size` level pixels at level coordinates out of cached decoded tiles."""

    def __init__(
        self,
        level: TiffLevel | NdpiLevel | MiraxLevel,
        cache_bytes: int = 64 << 20,
        read_size: int = 0,
        decoder: BatchDecoder | None = None,
    ) -> None:
        self.level = level
        # None: each tile on the CPU as it is needed; else batches (`batchdecode`), where the level has streams
        self.decoder = decoder if getattr(level, "batchable", True) else None
        self.decoded = {"batch": 0, "cpu": 0}  # stored tiles decoded by the batch decoder / the CPU path
        self.layouts: set[str] = set()  # stream layouts handed to the batch decoder (its verdicts on them)
        self._refused = False  # the decoder refused this level's layout: tiles go tile by tile, as without one
        self._layout: str | None = None  # the level's stream layout, from its first stream
        self._count_lock = threading.Lock()
        # NDPI blocks can be a whole level wide: keep every block row one `read_size` px read spans, plus the
        # next one (at least two), or patch rows thrash the cache
        row_bytes = level.tiles_x * level.tile_w * level.tile_h * 3 if level.kind == "ndpi" else 0
        rows = max(2, -(-max(0, read_size - 1) // level.tile_h) + 2)
        self.cache = TileCache(max(int(cache_bytes), rows * row_bytes))

    @property
    def batching(self) -> bool:
        """Whether tiles go through the batch decoder: there is one, and it has not refused this level's
        layout (a refused level reads as the CPU path does, each part decoding its tiles one by one, instead of
        claiming them all for one batch while the other thread waits: 33003 streamed at 0.7-0.8x the CPU path's
        speed that way, and at its speed (341 vs 343 patches/s) this way)."""
        return self.decoder is not None and not self._refused

    def _refuses(self, keys) -> bool:
        """Whether the decoder has refused this level's stream layout (known from the first stream of `keys`
        once, then a lookup), so that a refused level never claims a batch of tiles it will decode one by
        one."""
        if self._layout is None:
            stream = next((st for st in map(self.level.stream, keys) if st is not None), None)
            with contextlib.suppress(ValueError):
                self._layout = None if stream is None else stream_layout(stream)
        verdict = None if self._layout is None else self.decoder.verdict(self._layout)
        if verdict is not None and not verdict["accepted"]:
            self.layouts.add(self._layout)
            self._refused = True
        return self._refused

    def _load(self, key: tuple[int, int]) -> np.ndarray:
        """Decode one stored tile, into a recycled buffer where one of its shape is spare (or through the batch
        decoder, where there is one and the tile is a stream it takes)."""
        if self.batching:
            return _tile_or_raise(self._decode_batch([key])[key])
        self._count(cpu=1)
        return self.level.decode_tile(key, out=self.cache.recycled(self.level.tile_shape(key)))

    def _count(self, batch: int = 0, cpu: int = 0) -> None:
        with self._count_lock:
            self.decoded["batch"] += batch
            self.decoded["cpu"] += cpu

    def _decode_batch(self, keys: list[tuple[int, int]]) -> dict[tuple[int, int], np.ndarray | CorruptSlideError]:
        """`keys` through the batch decoder, one call per stream layout (normally one); a tile it cannot take,
        rejects, decodes to another shape than the CPU path's, or whose layout failed its check is decoded by
        the CPU path, whose error for a damaged tile is its value."""
        lv = self.level
        streams = {k: lv.stream(k) for k in keys}
        # JPEG whose scan is broken goes to libjpeg-turbo, which fails on it; nvImageCodec would decode it
        layouts: dict[str, list[tuple[int, int]]] = {}
        for k, st in streams.items():
            if st is not None and (lv.codec != "jpeg" or jpeg_scan_intact(st)):
                with contextlib.suppress(ValueError):
                    layouts.setdefault(stream_layout(st), []).append(k)
        out: dict = {}
        for layout, group in layouts.items():
            out.update(self._batch_layout(layout, group, streams))
        cpu = 0
        for k in keys:
            if k not in out:
                cpu += 1
                try:
                    out[k] = lv.decode_tile(k, out=self.cache.recycled(lv.tile_shape(k)))
                except CorruptSlideError as exc:
                    out[k] = exc
        self._count(batch=len(keys) - cpu, cpu=cpu)
        return out

    def _batch_layout(self, layout: str, keys: list[tuple[int, int]], streams: dict) -> dict:
        """{key: pixels} of the tiles of one stream layout that the batch decoder decoded to the CPU path's
        shape. The first time the process's decoder meets a layout, up to `CHECK_TILES` of them are decoded on
        the CPU as well and `BatchDecoder.judge` decides whether the layout is trusted; a refused layout
        returns nothing, here and from then on."""
        lv, dec = self.level, self.decoder
        self.layouts.add(layout)
        verdict = dec.verdict(layout)
        if verdict is not None and not verdict["accepted"]:
            self._refused = True
            return {}
        got = {}
        for k, image in zip(keys, dec.decode([streams[k] for k in keys], planar=lv.planar), strict=True):
            if image is not None and lv.planar:
                image = lv.from_planes(image, streams[k])
            if image is not None and image.shape == self._shape(k):
                got[k] = image
        if verdict is None:
            pairs = []
            for k in [k for k in keys if k in got][:CHECK_TILES] or keys[:CHECK_TILES]:
                with contextlib.suppress(CorruptSlideError):  # a damaged tile proves nothing either way
                    pairs.append((got.get(k), lv.decode_tile(k)))
            if not pairs:
                return {}
            if not dec.judge(layout, pairs)["accepted"]:
                self._refused = True
                return {}
        return got

    def _shape(self, key: tuple[int, int]) -> tuple[int, int, int]:
        """The shape `decode_tile(key)` returns for a stream-backed tile."""
        lv = self.level
        shape = lv.tile_shape(key)
        return shape if shape is not None else (lv.tile_h, lv.tile_w, 3)

    def tiles_of(self, origins: np.ndarray, size: int) -> list[list[tuple[int, int]]]:
        """The stored tiles each `size` px read at level `origins` [N, 2] touches, row-major per read."""
        lv = self.level
        if not len(origins):
            return []
        x0 = np.clip(origins[:, 0], 0, lv.width - 1) // lv.tile_w
        x1 = np.clip(origins[:, 0] + size - 1, 0, lv.width - 1) // lv.tile_w
        y0 = np.clip(origins[:, 1], 0, lv.height - 1) // lv.tile_h
        y1 = np.clip(origins[:, 1] + size - 1, 0, lv.height - 1) // lv.tile_h
        return [
            [(tx, ty) for ty in range(c, d + 1) for tx in range(a, b + 1)]
            for a, b, c, d in zip(x0.tolist(), x1.tolist(), y0.tolist(), y1.tolist(), strict=True)
        ]

    def decode_ahead(self, origins: np.ndarray, size: int) -> None:
        """Decode every stored tile that `size` px reads at level `origins` [N, 2] will touch, skipping those
        cached or being decoded by another thread, before any patch is cut: both reader threads keep decoding
        where their parts of a batch share tiles, instead of one waiting for the other's tile (a patch row
        shares its upper tile row with the row before). JPEG 2000 tiles cost 5-10 ms each; for JPEG tiles and
        MIRAX images it measured +5-10 % (OME-TIFF), +7-13 % (MRXS) and +4 % (SVS) patches/s, with less CPU
        (A/B in one process, interleaved). Not for NDPI: its blocks span the level's width where restart
        intervals are whole rows, and decoding a part's blocks first measured 4-7 % slower there. Skipped where
        the tiles would not all fit a quarter of the cache, so none is evicted before its patches are cut."""
        lv = self.level
        keys = dict.fromkeys(k for per_read in self.tiles_of(origins, size) for k in per_read)
        if len(keys) * lv.tile_w * lv.tile_h * 3 > self.cache.max_bytes // 4:
            return
        if self.batching and not self._refuses(keys):  # one call for every tile not cached or being decoded
            claims = self.cache.claim_free(keys)
            try:
                decoded = self._decode_batch([k for k, _ in claims])
            except BaseException:
                self.cache.release(claims)
                raise

            self.cache.fill_claimed(claims, lambda key: _tile_or_raise(decoded.pop(key)))
            return
        for key in keys:
            self.cache.ensure(key, self._load)

    def _inside(self, lx: int, ly: int, w: int, h: int) -> tuple[int, int, int, int] | None:
        """(x0, y0, x1, y1): the part of the read [lx, lx + w) x [ly, ly + h) inside the level; None if none."""
        lv = self.level
        cx0, cy0, cx1, cy1 = max(lx, 0), max(ly, 0), min(lx + w, lv.width), min(ly + h, lv.height)
        return (cx0, cy0, cx1, cy1) if cx0 < cx1 and cy0 < cy1 else None

    def busy(self, lx: int, ly: int, size: int) -> bool:
        """Whether a `size` px read at level (lx, ly) would now wait for a tile another thread is decoding."""
        box = self._inside(lx, ly, size, size)
        if box is None:
            return False
        cx0, cy0, cx1, cy1 = box
        tw, th = self.level.tile_w, self.level.tile_h
        keys = [
            (tx, ty) for ty in range(cy0 // th, (cy1 - 1) // th + 1) for tx in range(cx0 // tw, (cx1 - 1) // tw + 1)
        ]
        return self.cache.busy(keys)

    def read(self, lx: int, ly: int, size: int | tuple[int, int], out: np.ndarray | None = None) -> np.ndarray:
        """Level pixels `[ly, ly + h) x [lx, lx + w)` (size = side or (w, h)); outside the level is white."""
        lv = self.level
        w, h = (size, size) if isinstance(size, int) else size
        if out is None:
            out = np.empty((h, w, 3), np.uint8)
        x0, y0, x1, y1 = lx, ly, lx + w, ly + h
        if x0 < 0 or y0 < 0 or x1 > lv.width or y1 > lv.height:
            out[...] = 255  # outside the slide is white, as read_region promises
        box = self._inside(lx, ly, w, h)
        if box is None:
            return out
        cx0, cy0, cx1, cy1 = box
        tw, th = lv.tile_w, lv.tile_h
        for ty in range(cy0 // th, (cy1 - 1) // th + 1):
            ry0, ry1 = max(cy0, ty * th), min(cy1, (ty + 1) * th)
            for tx in range(cx0 // tw, (cx1 - 1) // tw + 1):
                rx0, rx1 = max(cx0, tx * tw), min(cx1, (tx + 1) * tw)
                tile = self.cache.get((tx, ty), self._load)
                out[ry0 - y0 : ry1 - y0, rx0 - x0 : rx1 - x0] = tile[
                    ry0 - ty * th : ry1 - ty * th, rx0 - tx * tw : rx1 - tx * tw
                ]
        return out

    def close(self) -> None:
        self.level.close()
