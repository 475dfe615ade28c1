"""Stream the patches of a grid as uint8 batches, in grid order, with bounded memory.

Batches are read by a thread pool (OpenSlide, libjpeg-turbo and numpy copies release the GIL) and at most
`max_inflight` batches exist at any time, so memory is bounded by batch size x in-flight count plus the tile
cache, whatever the slide size.

Two ways to get pixels, chosen per slide:
- fast: SVS with JPEG or JPEG 2000 tiles, generic tiled TIFF, OME-TIFF, NDPI and MIRAX with a regular camera
  grid are cut from stored tiles (NDPI: blocks of restart intervals) decoded once (`fasttiles.py`); pixels equal
  `read_region` exactly wherever the grid's level positions are whole pixels. On levels whose downsample is not
  a whole number (2.0003 after halving odd sizes) OpenSlide resamples each read by a sub-pixel shift; `fast="auto"`
  instead reads from the nearest level pixel (as the tifffile reader does), `fast="exact"` keeps OpenSlide's
  resampled pixels there at OpenSlide's speed;
- generic: the reader's `read_region`, one call per run of horizontally adjacent patches (up to `run_length`),
  which removes most of OpenSlide's per-call overhead; used for DICOM, MIRAX with overlapping camera fields and
  anything else.
Both resize the same way (area interpolation) when the grid reads more pixels than it delivers.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import cv2
import numpy as np

from service.errors import InvalidParameterError
from service.slides.area_resize import area_resize
from service.slides.batchdecode import batch_decoder, check_decoder
from service.slides.fasttiles import FastTiffSource, open_tiff_level
from service.slides.memory import keep_freed_memory

if TYPE_CHECKING:
    from service.slides.base import SlideReader
    from service.slides.grid import TileGrid

MAX_RUN_PIXELS = 4_000_000  # one generic read_region call covers at most this many level pixels
MIN_PART = 16  # patches: a batch is split across reader threads only into parts at least this large


def resize_patch(region: np.ndarray, size: int, out: np.ndarray | None = None) -> np.ndarray:
    """Area interpolation when shrinking (anti-aliased, like a box filter; OpenCV's INTER_AREA pixels at a
    fraction of its CPU, `area_resize`), linear if ever enlarging; into `out` ([size, size, 3] uint8, a
    batch's slot) when given."""
    if region.shape[:2] != (size, size):
        if region.shape[0] >= size:
            return area_resize(region, size, size, out=out)
        region = cv2.resize(region, (size, size), interpolation=cv2.INTER_LINEAR)
    if out is None:
        return region
    out[...] = region
    return out


def balanced_bounds(weights: np.ndarray, parts: int) -> list[int]:
    """Boundaries `[0, ..., len(weights)]` of `parts` runs (at most one per item) whose summed weights are about
    equal; every run holds at least one item, however the weight is spread."""
    count = len(weights)
    parts = max(1, min(parts, count))
    cum = np.cumsum(weights)
    bounds = [0]
    for k, cut in enumerate(np.searchsorted(cum, cum[-1] * np.arange(1, parts) / parts, side="left") + 1, 1):
        # strictly after the previous cut, and leaving an item for each run still to come
        bounds.append(min(max(int(cut), bounds[-1] + 1), count - (parts - k)))
    return [*bounds, count]


def _level_coords(coords: np.ndarray, downsample: float) -> np.ndarray:
    """Level pixel of each level-0 coordinate: the nearest one, as the readers land (pyramids written by
    halving odd sizes have downsamples like 2.0003, so exact division is the exception)."""
    if downsample == 1.0:
        return coords
    return np.rint(coords / downsample).astype(np.int64)


class PatchReader:
    """Reads patches of one grid; `read_batch(start, stop)` is thread-safe (readers must be too: OpenSlide,
    wsidicom and the pread-based tiff reader are)."""

    def __init__(
        self,
        reader: SlideReader,
        grid: TileGrid,
        *,
        fast: bool | str = "auto",
        cache_mb: int = 64,
        run_length: int = 8,
        decoder: str = "cpu",
    ) -> None:
        self.reader = reader
        self.grid = grid
        self.decoder = decoder
        self.coords = np.asarray(grid.coords, dtype=np.int64).reshape(-1, 2)
        self.run_length = max(1, int(run_length))
        self.fast_source: FastTiffSource | None = None
        if fast not in (True, False, "auto", "exact"):
            raise InvalidParameterError(f"fast must be True, False, 'auto' or 'exact', got {fast!r}")
        check_decoder(decoder)  # refused even where no tile is decoded
        level_coords = _level_coords(self.coords, grid.level_downsample)
        self.snapped = not self._same_pixels_as_reader(level_coords)
        if fast and not (fast == "exact" and self.snapped):
            lw, lh = reader.level_dimensions[grid.read_level]
            fast_level = getattr(reader, "fast_level", None)  # readers with tiles of their own (DICOM)
            level = (
                fast_level(grid.read_level)
                if fast_level is not None
                else open_tiff_level(getattr(reader, "path", ""), int(lw), int(lh))
            )
            if level is not None:
                self.fast_source = FastTiffSource(
                    level, cache_bytes=int(cache_mb) << 20, read_size=grid.read_size, decoder=batch_decoder(decoder)
                )
                self.level_coords = level_coords
        if fast is True and self.fast_source is None:
            raise InvalidParameterError("the fast tile path does not apply to this slide/grid")

    def _same_pixels_as_reader(self, level_coords: np.ndarray) -> bool:
        """Cutting stored tiles reproduces `read_region` when level coordinates are whole numbers, or when
        the reader itself snaps to the nearest level pixel (tifffile reader). OpenSlide resamples fractional
        positions (sub-pixel cairo translation)."""
        from service.slides.readers.dicom_reader import DicomReader
        from service.slides.readers.tiff_reader import TiffReader

        if isinstance(self.reader, TiffReader | DicomReader):  # both land on the nearest level pixel
            return True
        exact = self.coords / self.grid.level_downsample
        return bool(np.abs(exact - level_coords).max(initial=0.0) < 1e-6)

    def split(self, start: int, stop: int, parts: int) -> list[int]:
        """Boundaries `[start, ..., stop]` of `parts` runs of patches with about equal work. JPEG 2000 tiles
        cost 5-10 ms to decode, so there each patch weighs the tiles it is the last to touch plus a tenth of a
        tile (its cut), and two threads finish a small slide together (the 47-patch TCGA slide split 24 + 23 by
        count kept 1.6 of 2 cores busy: the second half had more tiles to decode; weighted, 1.95). Elsewhere
        equal counts: JPEG tiles and NDPI blocks cost about what cutting and resizing their patches does, and
        weighting them by tiles measured slower on NDPI. Every run has at least one patch."""
        count = stop - start
        parts = max(1, min(parts, count))
        if parts == 1:
            return [start, stop]
        if self.fast_source is None or self.fast_source.level.codec != "jpeg2000":
            weights = np.ones(count)
        else:  # a tile shared across a boundary is decoded by the later run, which starts on it
            seen: set[tuple[int, int]] = set()
            weights = np.empty(count)
            per_patch = self.fast_source.tiles_of(self.level_coords[start:stop], self.grid.read_size)
            for i in range(count - 1, -1, -1):
                weights[i] = 0.1 + sum(k not in seen for k in per_patch[i])
                seen.update(per_patch[i])
        return [start + b for b in balanced_bounds(weights, parts)]

    def read_info(self) -> dict:
        """How the patches were read, for a result's provenance: `path` (`mode`), the tile decoder asked for,
        and on the fast path the stored tiles decoded by the batch decoder and by the CPU path (a GPU decoder
        can differ from libjpeg-turbo by a few levels; tiles it hands back are the CPU path's), and the batch
        decoder's verdict on each stream layout it was given (`batchdecode.BatchDecoder.judge`)."""
        info: dict = {"path": self.mode, "tile_decoder": self.decoder}
        src = self.fast_source
        if src is not None:
            info["tiles_decoded"] = dict(src.decoded)
            if src.decoder is not None:
                verdicts = src.decoder.verdicts
                info["batch_checks"] = {k: verdicts[k] for k in sorted(src.layouts) if k in verdicts}
        return info

    @property
    def mode(self) -> str:
        """`fast-tiff` (JPEG / JPEG 2000 tiles), `fast-ndpi`, `fast-mrxs`, `fast-dicom` (frames) or
        `read_region`."""
        return f"fast-{self.fast_source.level.kind}" if self.fast_source is not None else "read_region"

    def read_batch(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Patches `[start, stop)` of the grid, written into `out` when given (a view of a larger batch)."""
        g = self.grid
        n = stop - start
        if out is None:
            out = np.empty((n, g.patch_size, g.patch_size, 3), np.uint8)
        src = self.fast_source
        if src is not None:
            rs = g.read_size
            # see FastTiffSource.decode_ahead; a batch decoder wants every part's tiles in one call
            ahead = src.level.kind != "ndpi" or src.batching
            if ahead:
                src.decode_ahead(self.level_coords[start:stop], rs)
            buf = None if rs == g.patch_size else np.empty((rs, rs, 3), np.uint8)
            later: list[tuple[int, int, int]] = []
            for i, (lx, ly) in enumerate(self.level_coords[start:stop].tolist()):
                # NDPI (no decoding ahead): a patch whose block the other thread is decoding waits until the
                # rest of the part is read, instead of this thread idling (2.5 ms a block, 8 % of its time on a
                # built 16k NDPI, where a batch's two parts share the block row between them; +5-7 % patches/s there)
                if not ahead and src.busy(lx, ly, rs):
                    later.append((i, lx, ly))
                else:
                    self._cut(i, lx, ly, out, buf)
            for i, lx, ly in later:
                self._cut(i, lx, ly, out, buf)
            return out
        self._read_generic(start, stop, out)
        return out

    def _cut(self, i: int, lx: int, ly: int, out: np.ndarray, buf: np.ndarray | None) -> None:
        """Patch `i` of a part (level origin lx, ly) from the fast source into `out[i]`, through `buf` and the
        area resize where the read is larger than the patch."""
        if buf is None:
            self.fast_source.read(lx, ly, self.grid.read_size, out=out[i])
        else:
            resize_patch(self.fast_source.read(lx, ly, self.grid.read_size, out=buf), self.grid.patch_size, out=out[i])

    def _read_generic(self, start: int, stop: int, out: np.ndarray) -> None:
        """Runs of patches on one row whose level-pixel offsets are integers are read with one call."""
        g = self.grid
        rs, ds = g.read_size, g.level_downsample
        coords = self.coords
        run_length = max(1, min(self.run_length, MAX_RUN_PIXELS // (rs * rs)))  # bounded region per call
        i = start
        while i < stop:
            x, y = (int(v) for v in coords[i])
            j = i + 1
            while (
                j < stop
                and j - i < run_length
                and coords[j, 1] == y
                and coords[j, 0] - coords[j - 1, 0] == g.step_level0
                and (ds == 1.0 or float(g.step_level0 / ds).is_integer())
            ):
                j += 1
            if j - i == 1:
                region = self.reader.read_region((x, y), g.read_level, (rs, rs))
                resize_patch(region, g.patch_size, out=out[i - start])
            else:
                step_l = round(g.step_level0 / ds)
                width = step_l * (j - i - 1) + rs
                region = self.reader.read_region((x, y), g.read_level, (width, rs))
                for k in range(j - i):
                    resize_patch(region[:, k * step_l : k * step_l + rs], g.patch_size, out=out[i - start + k])
            i = j

    def close(self) -> None:
        if self.fast_source is not None:
            self.fast_source.close()


def iter_batches(
    reader: SlideReader,
    grid: TileGrid,
    batch_size: int = 64,
    workers: int = 2,
    *,
    fast: bool | str = "auto",
    max_inflight: int | None = None,
    cache_mb: int = 64,
    run_length: int = 8,
    decoder: str = "cpu",
    info: dict | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield `(patches uint8 [B, S, S, 3], coords int64 [B, 2])` in grid order.

    At most `max_inflight` batches (default `workers + 1`) are being read or waiting to be consumed; closing
    the generator early cancels what has not started. `decoder` picks the fast path's tile decoder
    (`batchdecode.TILE_DECODERS`: "cpu", or nvImageCodec on a GPU); `info`, when given, receives
    `PatchReader.read_info()` once the readers have stopped.
    """
    if batch_size < 1 or workers < 1:
        raise InvalidParameterError(f"batch_size and workers must be ≥ 1, got {batch_size}, {workers}")
    n = len(grid.coords)
    if n == 0:
        return
    inflight = max(1, max_inflight if max_inflight is not None else workers + 1)
    keep_freed_memory()  # tiles and batches reuse freed heap instead of faulting in fresh pages (memory.py)
    patches = PatchReader(reader, grid, fast=fast, cache_mb=cache_mb, run_length=run_length, decoder=decoder)
    size = grid.patch_size
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mstar-tiles")
    pending: deque[tuple[int, int, np.ndarray, list[Future]]] = deque()

    def submit(start: int, stop: int) -> None:
        # a batch is read in up to `workers` parts of at least MIN_PART patches, so that both cores work on a
        # small slide (or the last batch) too, not only when several batches are in flight; parts of equal work
        # (`PatchReader.split`), or a 42-patch slide would be read as 32 + 10 and one core would do most of it
        count = stop - start
        bounds = patches.split(start, stop, min(workers, count // MIN_PART))
        out = np.empty((count, size, size, 3), np.uint8)
        futs = [
            pool.submit(patches.read_batch, a, b, out[a - start : b - start]) for a, b in itertools.pairwise(bounds)
        ]
        pending.append((start, stop, out, futs))

    def take() -> tuple[np.ndarray, np.ndarray]:
        s, e, out, futs = pending.popleft()
        for f in futs:
            f.result()
        return out, patches.coords[s:e]

    try:
        for start in range(0, n, batch_size):
            submit(start, min(start + batch_size, n))
            if len(pending) >= inflight:
                yield take()
        while pending:
            yield take()
    finally:
        for *_, futs in pending:
            for f in futs:
                f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        if info is not None:
            info.update(patches.read_info())
        patches.close()


def count_batches(grid: TileGrid, batch_size: int = 64) -> int:
    return math.ceil(len(grid.coords) / batch_size)
