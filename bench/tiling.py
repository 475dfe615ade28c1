"""Tiling benchmark: per slide format, our patch reader against an OpenSlide `read_region` loop and against the
decode-once ceiling of the same file, measured side by side in one run.

Run: `.venv/bin/python bench/tiling.py [--quick] [--json out/bench/tiling.json]`

Slides (real pixels throughout; the large ones are built here from mirrored copies of CMU-1-Small-Region and
cached under out/bench/):
- JPEG SVS 0.5: a >= 20,000 x 20,000 px Aperio-style SVS (tiled JPEG, 2x pyramid) labelled 0.5 µm/px;
- JPEG SVS 0.25 (4x): a 12,000 px Aperio-style SVS labelled 0.25 µm/px with a 4x pyramid, so a 0.5 µm/px grid
  reads 448 px of level 0 and area-resizes to 224 (the resize path);
- NDPI (restart-interval JPEG), Aperio JPEG 2000 (33005; no µm/px, read with a 0.25 override), DICOM WSI: the
  real samples in ../shared/data/slides;
- NDPI built, 16k: a 16,384 px NDPI of the mirrored pixels labelled 40x, once with restart intervals a whole
  row (the sample's layout) and once with 2,048 px ones (256 MCUs, as in most scanner files);
- OME-TIFF: a pyramidal OME-TIFF (SubIFDs) of the mirrored pixels;
- MRXS: a MIRAX slide (Slidedat.ini + Index.dat + Data0000.dat, one JPEG per 256 px camera image, no overlap)
  of the mirrored pixels; no real MRXS sample exists here. "MRXS, generic path" reads it through `read_region`
  runs (`fast=False`), as every slide without a fast path reads (MIRAX scanner files with camera overlaps);
- JPEG 2000 YCbCr (Aperio 33003): 2,048 x 2,048 real CMU pixels, 4:2:2 chroma, tiles coded by opj_compress
  (Debian libopenjp2-tools); no real 33003 sample exists here.

Per slide, each of these is run `--repeats` times, interleaved, and the median is reported:
- ours: patches/s of `iter_batches` (2 workers) over every grid patch, CPU ms per patch (all threads) and the
  peak RSS growth while streaming;
- loop: a plain OpenSlide `read_region` loop over the same coordinates with 2 threads (same level and read
  size, same area resize); where OpenSlide cannot read the slide's levels, our own reader's generic
  `read_region` path with 2 threads instead (column `baseline`);
- ceiling: every stored tile (NDPI: block) that the grid touches decoded exactly once on 2 threads, no cutting
  or resizing, in patch-equivalents/s (patches of the grid / seconds); only where the fast path applies (on
  DICOM each frame goes through the reader's own decode: wsidicom's decoder, or libjpeg-turbo for mislabelled
  colour).
`vs_loop` = ours / loop (goal >= 2 on every format), `of_ceil` = ours / ceiling (goal >= 0.85 on JPEG TIFF).
`--decoder nvimgcodec` (a GPU; `nvimgcodec-cpu`: its CPU backends) adds ours through that batch tile decoder,
interleaved with the rest, and its pixels against the CPU path's (`bench/gpu_decode.sh` runs it on a GPU machine).
Timings on a shared machine are noisy: compare the ratios, which come from the same minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import openslide
import psutil
import tifffile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.slides.batchdecode import TILE_DECODERS  # noqa: E402
from service.slides.grid import build_grid  # noqa: E402
from service.slides.memory import keep_freed_memory  # noqa: E402
from service.slides.open import open_slide  # noqa: E402
from service.slides.stream import PatchReader, iter_batches, resize_patch  # noqa: E402

# the real samples; MSTAR_BENCH_SLIDES: a copy of them elsewhere (bench/gpu/tiles.sh carries one to a GPU machine)
SLIDES = Path(os.environ.get("MSTAR_BENCH_SLIDES", ROOT.parent / "shared" / "data" / "slides"))
CMU = SLIDES / "CMU-1-Small-Region.svs"
BENCH_DIR = ROOT / "out" / "bench"
FIELD_MPP = 128 / 224  # the released mSTAR/UNI field of view: 128 µm in a 224 px patch
LARGE_SIDE = 20_000
TILE = 256
JPEG_QUALITY = 80


# --- the built slides ------------------------------------------------------------------------------------


def _mirror_index(n: int, period: int) -> np.ndarray:
    """Indices 0..n-1 folded onto a source of length `period` by mirroring (… a b c c b a a b c …)."""
    m = np.arange(n) % (2 * period)
    return np.where(m < period, m, 2 * period - 1 - m)


def _tiles(src: np.ndarray, width: int, height: int):
    """Row-major 256 px tiles of the mirrored tiling of `src` over width x height (edge tiles padded)."""
    ix = _mirror_index(math.ceil(width / TILE) * TILE, src.shape[1])
    iy = _mirror_index(math.ceil(height / TILE) * TILE, src.shape[0])
    for ty in range(0, height, TILE):
        rows = src[iy[ty : ty + TILE]]
        for tx in range(0, width, TILE):
            yield rows[:, ix[tx : tx + TILE]]


def build_slide(min_side: int, mpp: float, factor: int, kind: str) -> Path:
    """A tiled JPEG pyramid of mirrored CMU pixels, cached: `kind` "svs" (Aperio description, one IFD per
    level, what OpenSlide's aperio driver reads) or "ome" (OME-TIFF, reductions in SubIFDs); levels shrink by
    `factor` until the longest side is <= 1024 px."""
    with openslide.OpenSlide(str(CMU)) as s:
        src = np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))
    h0, w0 = src.shape[:2]
    width = math.ceil(min_side / w0) * w0
    height = math.ceil(min_side / h0) * h0
    suffix = ".svs" if kind == "svs" else ".ome.tif"
    out = BENCH_DIR / f"cmu-mirror-{width}x{height}-{mpp}mpp-x{factor}-q{JPEG_QUALITY}{suffix}"
    if out.exists():
        return out
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    t0 = time.perf_counter()
    sizes = [(width, height)]
    while max(sizes[-1]) > 1024:
        sizes.append((sizes[-1][0] // factor, sizes[-1][1] // factor))
    with tifffile.TiffWriter(tmp, bigtiff=True, ome=kind == "ome") as tif:
        for i, (lw, lh) in enumerate(sizes):
            ds = factor**i
            level = (
                src if i == 0 else cv2.resize(src, (max(1, w0 // ds), max(1, h0 // ds)), interpolation=cv2.INTER_AREA)
            )
            px_per_cm = 10_000.0 / (mpp * ds)
            extra: dict = {}
            if kind == "svs":
                desc = f"Aperio Image Library v12.0.15\r\n{lw}x{lh} [0,0 {lw}x{lh}] ({TILE}x{TILE}) "
                desc += f"JPEG/RGB Q={JPEG_QUALITY}"
                if i == 0:
                    desc += f"|AppMag = {round(10 / mpp)}|MPP = {mpp}"
                extra = {"description": desc, "subfiletype": 1 if i else 0, "metadata": None}
            elif i == 0:
                extra = {
                    "subifds": len(sizes) - 1,
                    "metadata": {"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp},
                }
            else:
                extra = {"subfiletype": 1}
            tif.write(
                _tiles(level, lw, lh),
                shape=(lh, lw, 3),
                dtype=np.uint8,
                tile=(TILE, TILE),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": JPEG_QUALITY},
                resolution=(px_per_cm, px_per_cm),
                resolutionunit="CENTIMETER",
                maxworkers=2,
                **extra,
            )
    tmp.rename(out)
    print(f"# built {out.name} ({width}x{height}) in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


def _fixtures():
    """tests/slide_fixtures.py, the writers the tests use."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("slide_fixtures", ROOT / "tests" / "slide_fixtures.py")
    fixtures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixtures)
    return fixtures


def build_j2k_ycbcr(width: int = 2048, height: int = 2048) -> Path:
    """An Aperio JPEG 2000 YCbCr (33003) SVS of `width` x `height` real pixels (4:2:2, lossy), cached; written
    by the tests' writer with OpenJPEG's opj_compress (no such sample exists here). 2,048 px square: a crop of
    CMU-1-Small-Region; wider: a strip of the mirrored JPEG SVS (`build_slide`), as wide as real slides are."""
    out = BENCH_DIR / (f"cmu-{width}-33003.svs" if width == height == 2048 else f"cmu-{width}x{height}-33003.svs")
    if not out.exists():
        BENCH_DIR.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        if width == height == 2048:
            src, origin = CMU, (0, 2967 - height)
        else:
            src, origin = build_slide(LARGE_SIDE, 0.5, 2, "svs"), (0, 6000)
        tmp = out.with_name(out.stem + ".tmp.svs")
        _fixtures().write_aperio_j2k_ycbcr(src, tmp, origin=origin, width=width, height=height)
        tmp.rename(out)
        print(f"# built {out.name} in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


def build_mirax(min_side: int, mpp: float = 0.5) -> Path:
    """A MIRAX slide of mirrored CMU pixels (regular camera grid, no overlap), cached; written by the same
    writer the tests use (tests/slide_fixtures.py)."""
    with openslide.OpenSlide(str(CMU)) as s:
        src = np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))
    h0, w0 = src.shape[:2]
    width, height = math.ceil(min_side / w0) * w0, math.ceil(min_side / h0) * h0
    out = BENCH_DIR / f"cmu-mirror-{width}x{height}-{mpp}mpp.mrxs"
    if out.exists():
        return out
    fixtures = _fixtures()
    pixels = src[_mirror_index(height, h0)][:, _mirror_index(width, w0)]
    t0 = time.perf_counter()
    fixtures.write_mirax(pixels, out, levels=5, quality=JPEG_QUALITY, mpp=mpp)
    print(f"# built {out.name} ({width}x{height}) in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


def build_ndpi(side: int = 16_384, mpp: float = 0.2282, interval_mcus: int | None = None) -> Path:
    """A Hamamatsu NDPI (40x, 4 levels, each one JPEG strip cut by restart markers: every 8 px row, as in the
    sample, or every `interval_mcus` 8 px MCUs, 256 in most scanner files) of mirrored CMU pixels, cached;
    written by the tests' writer (tests/slide_fixtures.py). The real sample has 65 patches at 0.5 µm/px; this
    one has 500, so the ratio is not set by one slow block at a part boundary. The CMU pixels are 0.5 µm/px,
    labelled 40x here: tissue looks half the size."""
    cut = "" if interval_mcus is None else f"-ri{interval_mcus}"
    out = BENCH_DIR / f"cmu-mirror-{side}x{side}-{mpp}mpp-40x{cut}.ndpi"
    if out.exists():
        return out
    with openslide.OpenSlide(str(CMU)) as s:
        src = np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))
    pixels = src[_mirror_index(side, src.shape[0])][:, _mirror_index(side, src.shape[1])]
    t0 = time.perf_counter()
    tmp = out.with_name(out.stem + ".tmp.ndpi")
    _fixtures().write_ndpi(pixels, tmp, levels=4, mpp=mpp, quality=JPEG_QUALITY, interval_mcus=interval_mcus)
    tmp.rename(out)
    print(f"# built {out.name} in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


# --- measurements ----------------------------------------------------------------------------------------


class PeakRss:
    """Samples this process's RSS in a background thread; `peak - base` is the growth while active."""

    def __init__(self, interval: float = 0.02) -> None:
        self.proc = psutil.Process()
        self.interval = interval
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRss:
        self.base = self.peak = self.proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def stream_rate(
    path: Path, grid, mpp_override: float | None, workers: int, fast: bool | str = "auto", decoder: str = "cpu"
) -> dict:
    """patches/s, CPU ms per patch (all threads), RSS growth and peak while streaming every patch."""
    with open_slide(path, mpp_override=mpp_override) as reader:
        probe = PatchReader(reader, grid, fast=fast)
        mode = probe.mode
        probe.close()
        n = 0
        checksum = 0.0
        with PeakRss() as rss:
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0, c0 = time.perf_counter(), time.process_time()
            for batch, _ in iter_batches(reader, grid, batch_size=64, workers=workers, fast=fast, decoder=decoder):
                n += len(batch)
                checksum += float(batch[:, ::37, ::37].mean())  # touch the data like a consumer would
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    return {
        "rate": n / dt,
        "cpu_ms": 1000 * cpu / n,
        "faults": faults / n,
        "rss": rss.peak - rss.base,
        "peak": rss.peak,
        "mode": mode,
    }


def openslide_path(path: Path) -> Path:
    """OpenSlide opens a DICOM series through any one of its files."""
    return next(iter(sorted(path.glob("*.dcm")))) if path.is_dir() else path


def _chunks(items: list, threads: int, most: int = 64) -> list[list]:
    """At most `most` items a chunk, and at least 4 chunks a thread where there are items enough, so that a
    small slide (47 patches, 10 NDPI blocks) keeps every thread busy instead of handing one thread everything."""
    size = max(1, min(most, -(-len(items) // (4 * threads))))
    return [items[i : i + size] for i in range(0, len(items), size)]


def _timed_threads(fn, chunks: list, threads: int) -> tuple[float, float]:
    """(wall s, CPU s of the process) to run `fn` over `chunks` on `threads` threads."""
    t0, c0 = time.perf_counter(), time.process_time()
    if threads == 1:
        for c in chunks:
            fn(c)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(fn, chunks))
    return time.perf_counter() - t0, time.process_time() - c0


def script_resize(patch: np.ndarray, size: int) -> np.ndarray:
    """The baseline's shrink, what a user script does: OpenCV's `INTER_AREA` to `size` x `size` px (our
    `resize_patch` must give the same pixels); a patch already that size is returned as it is."""
    if patch.shape[0] == size and patch.shape[1] == size:
        return patch
    return cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA)


def openslide_rate(path: Path, grid, threads: int = 2) -> tuple[float, float]:
    """(patches/s, CPU ms per patch) of a plain OpenSlide loop over the grid's coordinates."""
    coords = [(int(x), int(y)) for x, y in grid.coords]
    level, rs, ps = grid.read_level, grid.read_size, grid.patch_size
    with openslide.OpenSlide(str(openslide_path(path))) as s:

        def read(chunk: list[tuple[int, int]]) -> None:  # what a typical script does: OpenSlide + cv2 INTER_AREA
            for xy in chunk:
                script_resize(np.asarray(s.read_region(xy, level, (rs, rs)).convert("RGB")), ps)

        dt, cpu = _timed_threads(read, _chunks(coords, threads), threads)
    return len(coords) / dt, 1000 * cpu / len(coords)


def reader_loop_rate(path: Path, grid, mpp_override: float | None, threads: int = 2) -> tuple[float, float]:
    """The baseline where OpenSlide cannot read the levels: our reader's own `read_region`, one patch a call."""
    coords = [(int(x), int(y)) for x, y in grid.coords]
    with open_slide(path, mpp_override=mpp_override) as r:

        def read(chunk: list[tuple[int, int]]) -> None:
            for xy in chunk:
                script_resize(r.read_region(xy, grid.read_level, (grid.read_size,) * 2), grid.patch_size)

        dt, cpu = _timed_threads(read, _chunks(coords, threads), threads)
    return len(coords) / dt, 1000 * cpu / len(coords)


def touched_tiles(pr: PatchReader) -> list[tuple[int, int]]:
    """Every stored tile (NDPI block) that a patch of the reader's grid overlaps, in row-major order."""
    keys = {k for per_patch in pr.fast_source.tiles_of(pr.level_coords, pr.grid.read_size) for k in per_patch}
    return sorted(keys, key=lambda k: (k[1], k[0]))


def ceiling_rate(path: Path, grid, mpp_override: float | None, threads: int = 2) -> float | None:
    """Patch-equivalents/s when every stored tile (NDPI block, DICOM frame) the grid touches is decoded exactly
    once on `threads` threads, with nothing else done: what any tile-based reader of this file can at most
    reach."""
    with open_slide(path, mpp_override=mpp_override) as r:
        pr = PatchReader(r, grid)
        try:
            if pr.fast_source is None:
                return None
            lv = pr.fast_source.level
            ordered = touched_tiles(pr)
            dt, _ = _timed_threads(lambda c: [lv.decode_tile(k) for k in c], _chunks(ordered, threads, 16), threads)
        finally:
            pr.close()
    return len(grid) / dt


def best_cpu_ms(fn, n: int = 200) -> float:
    """CPU ms of one `fn()` call on this thread, best of 3 rounds of `n` calls."""
    best = math.inf
    for _ in range(3):
        c0 = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, (time.process_time() - c0) / n)
    return 1000 * best


def resize_cost(read: int, size: int, n: int = 200) -> tuple[float, float]:
    """CPU ms of one area resize `read` -> `size` px, best of 3: (ours = `resize_patch`, the loop's
    `script_resize`); identical pixels."""
    patch = np.random.default_rng(0).integers(0, 256, (read, read, 3), np.uint8)
    return best_cpu_ms(lambda: resize_patch(patch, size), n), best_cpu_ms(lambda: script_resize(patch, size), n)


def _area_weights(read: int, size: int) -> np.ndarray:
    """[size, read] exact area (box) weights: output pixel i averages [i * s, (i + 1) * s), s = read / size."""
    s = read / size
    w = np.zeros((size, read), np.float32)
    for i in range(size):
        a, b = i * s, (i + 1) * s
        for k in range(math.floor(a), min(read, math.ceil(b))):
            w[i, k] = (min(b, k + 1) - max(a, k)) / s
    return w


def resize_candidates(read: int, size: int, n: int = 200) -> list[dict]:
    """CPU ms per patch (best of 3, one thread) and max / mean |difference| to cv2 INTER_AREA of the ways to
    area-resize a `read` px patch of real pixels (CMU) to `size` px; INTER_LINEAR is listed for scale only
    (not an area filter)."""
    import scipy.sparse
    from PIL import Image

    with openslide.OpenSlide(str(CMU)) as s:
        patch = np.ascontiguousarray(np.asarray(s.read_region((600, 400), 0, (read, read)).convert("RGB")))
    sparse = scipy.sparse.csr_matrix(_area_weights(read, size))

    def sparse_area(a: np.ndarray) -> np.ndarray:  # exact weights, two sparse products
        v = (sparse @ a.reshape(read, -1).astype(np.float32)).reshape(size, read, 3)
        h = sparse @ v.transpose(1, 0, 2).reshape(read, size * 3)
        return np.rint(h.reshape(size, size, 3).transpose(1, 0, 2)).astype(np.uint8)

    def two_pass(a: np.ndarray) -> np.ndarray:  # rows, then columns, each a 1-axis INTER_AREA
        v = cv2.resize(a.reshape(read, -1), (read * 3, size), interpolation=cv2.INTER_AREA).reshape(size, read, 3)
        return cv2.resize(v, (size, size), interpolation=cv2.INTER_AREA)

    cands = {
        "area_resize (resize_patch)": lambda a: resize_patch(a, size),
        "cv2 INTER_AREA (uint8)": lambda a: script_resize(a, size),
        "cv2 INTER_AREA on float32": lambda a: cv2.convertScaleAbs(
            cv2.resize(a.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
        ),
        "cv2 INTER_AREA, two 1-axis passes": two_pass,
        "Pillow BOX": lambda a: np.asarray(Image.fromarray(a).resize((size, size), Image.Resampling.BOX)),
        "scipy sparse exact weights": sparse_area,
        "cv2 INTER_LINEAR (not area)": lambda a: cv2.resize(a, (size, size), interpolation=cv2.INTER_LINEAR),
    }
    ref = script_resize(patch, size).astype(int)
    rows = []
    for name, fn in cands.items():
        cpu_ms = best_cpu_ms(lambda fn=fn: fn(patch), n)
        d = np.abs(fn(patch).astype(int) - ref)
        rows.append({"resize": f"{read}->{size}", "way": name, "cpu_ms": cpu_ms, "max": int(d.max()), "mean": d.mean()})
    return rows


def pixel_check(
    path: Path, grid, mpp_override: float | None, n: int = 100, fast: bool | str = "auto"
) -> tuple[int, float]:
    """(max, mean) |difference| between our first `n` patches and OpenSlide's own for the same coordinates."""
    sub = _subset(grid, n)
    with open_slide(path, mpp_override=mpp_override) as reader:
        ours = np.concatenate([b for b, _ in iter_batches(reader, sub, fast=fast)])
    with openslide.OpenSlide(str(openslide_path(path))) as s:
        ref = np.stack(
            [
                script_resize(  # OpenSlide + OpenCV, as the loop: our area_resize must give the same pixels
                    np.asarray(s.read_region((int(x), int(y)), grid.read_level, (grid.read_size,) * 2).convert("RGB")),
                    grid.patch_size,
                )
                for x, y in sub.coords
            ]
        )
    d = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
    return int(d.max()), float(d.mean())


def decoder_check(path: Path, grid, mpp_override: float | None, decoder: str, n: int = 100) -> tuple:
    """(max, mean |difference|, tiles handed back to the CPU path, the decoder's verdict on each stream layout
    of the slide) of the first `n` patches read through the batch `decoder` against the CPU path's. A layout
    whose check failed reads on the CPU (difference 0 there): its verdict keeps the decoder's own difference."""
    from service.slides.batchdecode import batch_decoder

    sub = _subset(grid, n)
    info: dict = {}
    with open_slide(path, mpp_override=mpp_override) as reader:
        ref = np.concatenate([b for b, _ in iter_batches(reader, sub)]).astype(np.int16)
        dec = batch_decoder(decoder)
        dec.rejected = 0
        got = np.concatenate([b for b, _ in iter_batches(reader, sub, decoder=decoder, info=info)]).astype(np.int16)
    diff = np.abs(got - ref)
    return int(diff.max()), float(diff.mean()), dec.rejected, info.get("batch_checks", {})


def checks_summary(checks: dict) -> str:
    """One table cell for the verdicts: ok, or each refused layout with the decoder's max / mean difference."""
    refused = [
        f"NO {layout} ({v.get('max_diff', '-')}/{v.get('mean_diff', '-')})"
        for layout, v in checks.items()
        if not v["accepted"]
    ]
    return "; ".join(refused) or ("ok" if checks else "-")


def openslide_comparable(path: Path, grid) -> bool:
    """OpenSlide must see the same level geometry as our reader (not true for OME SubIFD levels)."""
    try:
        with openslide.OpenSlide(str(openslide_path(path))) as s:
            return grid.read_level < s.level_count and s.dimensions == (grid.level0_width, grid.level0_height)
    except openslide.OpenSlideError:
        return False


# rows named so read through the generic path (OpenSlide read_region runs, as slides without a fast path do:
# MIRAX with overlapping camera fields or a position buffer, Leica, Ventana, Philips...)
GENERIC = ", generic path"
MEDIAN_PATCHES = 1_500  # a small slide is streamed more often, so each median covers about this many patches
MAX_SAMPLES = 15


def samples(repeats: int, patches: int) -> int:
    """Interleaved samples of each column: at least `repeats`; a 65-patch slide streams in 30 ms, where this
    machine's hiccups moved a median of 3 by 10 %, so up to MAX_SAMPLES until MEDIAN_PATCHES are covered."""
    return max(1, repeats, min(MAX_SAMPLES, math.ceil(MEDIAN_PATCHES / max(1, patches)))) if repeats > 1 else 1


def bench_slide(
    name: str,
    path: Path,
    mpp_override: float | None,
    repeats: int,
    max_patches: int | None,
    target_mpp: float = 0.5,
    fast: bool | str = "auto",
    decoder: str = "cpu",
) -> dict:
    """One table row; `fast=False` measures the generic read path (what slides without a fast path get).
    With a batch `decoder` (`--decoder`), ours through it is measured too, interleaved with the rest (`dec*`
    columns), and its patches are compared with the CPU path's (`dec_max_diff`, `dec_mean_diff`)."""
    with open_slide(path, mpp_override=mpp_override) as reader:
        grid = build_grid(reader, target_mpp=target_mpp)
        fmt = reader.vendor or reader.format
    full = len(grid)
    if max_patches is not None and full > max_patches:
        grid = _subset(grid, max_patches)
    comparable = openslide_comparable(path, grid)
    row = {
        "slide": name,
        "size": f"{grid.level0_width}x{grid.level0_height}",
        "reader": fmt,
        "patches": full,
        "measured": len(grid),
        "level": grid.read_level,
        "read": grid.read_size,
        "baseline": "openslide" if comparable else "reader",
    }
    if grid.read_size != grid.patch_size:
        row["cpu_resize"], row["cpu_resize_cv2"] = resize_cost(grid.read_size, grid.patch_size)
    ours, loop, ceil, dec = [], [], [], []
    decoder = decoder if fast and decoder != "cpu" else "cpu"
    row["samples"] = samples(repeats, len(grid))
    if repeats > 1:  # one untimed round of each column first: a worker's later slides run in memory already
        # mapped (the first stream in a process pays 30 page faults a patch filling the tile cache); its RSS
        # growth counts (the memory a reader needs), its rate does not
        ours.append(stream_rate(path, grid, mpp_override, workers=2, fast=fast))
        openslide_rate(path, grid) if comparable else reader_loop_rate(path, grid, mpp_override)
        ceiling_rate(path, grid, mpp_override) if fast else None
        if decoder != "cpu":
            stream_rate(path, grid, mpp_override, workers=2, fast=fast, decoder=decoder)
    for _ in range(row["samples"]):  # interleaved, so each repeat sees the same machine load
        ours.append(stream_rate(path, grid, mpp_override, workers=2, fast=fast))
        loop.append(openslide_rate(path, grid) if comparable else reader_loop_rate(path, grid, mpp_override))
        ceil.append(ceiling_rate(path, grid, mpp_override) if fast else None)
        if decoder != "cpu":
            dec.append(stream_rate(path, grid, mpp_override, workers=2, fast=fast, decoder=decoder))
    row["mode"] = ours[0]["mode"]
    row["rss_mb"] = max(r["rss"] for r in ours) / 2**20  # the first run grows; later ones reuse freed memory
    row["rss_peak_mb"] = max(r["peak"] for r in ours) / 2**20
    ours = ours[-row["samples"] :]  # the timed ones
    row["ours"] = statistics.median(r["rate"] for r in ours)
    row["cpu_ours"] = statistics.median(r["cpu_ms"] for r in ours)
    row["faults_ours"] = statistics.median(r["faults"] for r in ours)  # page faults a patch (memory.py)
    row["loop"] = statistics.median(r for r, _ in loop)
    row["cpu_loop"] = statistics.median(c for _, c in loop)
    row["vs_loop"] = row["ours"] / row["loop"]
    if ceil[0] is not None:
        row["ceiling"] = statistics.median(ceil)
        row["of_ceil"] = row["ours"] / row["ceiling"]
    if dec:
        row["dec"] = statistics.median(r["rate"] for r in dec)
        row["dec_vs_loop"] = row["dec"] / row["loop"]
        row["cpu_dec"] = statistics.median(r["cpu_ms"] for r in dec)
        row["dec_max_diff"], row["dec_mean_diff"], row["dec_fallbacks"], row["dec_checks"] = decoder_check(
            path, grid, mpp_override, decoder
        )
        row["dec_check"] = checks_summary(row["dec_checks"])
    if comparable:
        row["max_abs_diff"], row["mean_abs_diff"] = pixel_check(path, grid, mpp_override, fast=fast)
    return row


def breakdown(path: Path, grid, mpp_override: float | None, repeats: int = 3) -> dict:
    """Where one patch's CPU time goes, on one thread (best of `repeats`, ms a patch): OpenSlide's
    `read_region` from a cold cache; ours (`read_batch` over the grid, default tile cache) split into decoding
    every touched stored tile once into one reused buffer, cutting patches out of decoded tiles, the area
    resize, and `other` = the rest (filling the tile cache with fresh arrays, its lookups, Python per patch).
    The output array is allocated and written before the timer starts, as the streaming reader's batches are
    reused memory (a fresh 90-150 MB array for every patch at once cost 28-37 page faults a patch)."""
    best: dict[str, float] = {}

    def keep(name: str, seconds: float) -> None:
        best[name] = min(best.get(name, math.inf), 1000 * seconds / len(grid))

    rs, ps = grid.read_size, grid.patch_size
    buf = np.empty((rs, rs, 3), np.uint8)
    with open_slide(path, mpp_override=mpp_override) as reader:
        for _ in range(repeats):
            if openslide_comparable(path, grid):
                with openslide.OpenSlide(str(openslide_path(path))) as s:
                    c0 = time.process_time()
                    for x, y in grid.coords:
                        np.asarray(s.read_region((int(x), int(y)), grid.read_level, (rs, rs)).convert("RGB"))
                    keep("openslide_read", time.process_time() - c0)
            pr = PatchReader(reader, grid)
            warm = PatchReader(reader, grid, cache_mb=1 << 16)  # nothing evicted: its second pass only cuts
            try:
                if pr.fast_source is None:
                    return {}
                out = np.zeros((len(grid), ps, ps, 3), np.uint8)  # touched first: its page faults are not ours
                c0 = time.process_time()
                pr.read_batch(0, len(grid), out)
                keep("ours_cold", time.process_time() - c0)
                del out
                lv, targets = pr.fast_source.level, {}
                keys = touched_tiles(pr)
                c0 = time.process_time()
                for k in keys:
                    shape = lv.tile_shape(k)
                    lv.decode_tile(
                        k, out=None if shape is None else targets.setdefault(shape, np.empty(shape, np.uint8))
                    )
                keep("decode_once", time.process_time() - c0)
                for lx, ly in warm.level_coords:
                    warm.fast_source.read(int(lx), int(ly), rs, out=buf)
                c0 = time.process_time()
                for lx, ly in warm.level_coords:
                    warm.fast_source.read(int(lx), int(ly), rs, out=buf)
                keep("cut", time.process_time() - c0)
                for name, shrink in (  # ours, and the loop's (same pixels; not part of ours_cold)
                    ("resize", lambda: resize_patch(buf, ps)),
                    ("resize_cv2", lambda: script_resize(buf, ps)),
                ):
                    c0 = time.process_time()
                    for _ in range(len(grid) if rs != ps else 0):
                        shrink()
                    keep(name, time.process_time() - c0 if rs != ps else 0.0)
            finally:
                pr.close()
                warm.close()
    best["other"] = best["ours_cold"] - best["decode_once"] - best["cut"] - best["resize"]
    if "openslide_read" in best:  # a reader that only decoded each tile once and resized, against the loop
        best["best_ratio"] = (best["openslide_read"] + best["resize_cv2"]) / (best["decode_once"] + best["resize"])
    return best


def _subset(grid, n: int):
    """The first `n` patches in grid order (contiguous rows, as a real run reads them)."""
    from dataclasses import replace

    return replace(grid, coords=grid.coords[:n], tissue_fraction=grid.tissue_fraction[:n])


def print_table(rows: list[dict]) -> None:
    # (key, width, format of the value)
    cols = [
        ("slide", 22, "{}"),
        ("size", 11, "{}"),
        ("measured", 8, "{}"),
        ("samples", 7, "{}"),
        ("level", 5, "{}"),
        ("read", 4, "{}"),
        ("mode", 11, "{}"),
        ("baseline", 9, "{}"),
        ("ours", 6, "{:.0f}"),
        ("loop", 6, "{:.0f}"),
        ("vs_loop", 7, "{:.2f}"),
        ("ceiling", 7, "{:.0f}"),
        ("of_ceil", 7, "{:.2f}"),
        ("cpu_ours", 8, "{:.2f}"),
        ("cpu_loop", 8, "{:.2f}"),
        ("cpu_resize", 10, "{:.2f}"),
        ("cpu_resize_cv2", 14, "{:.2f}"),
        ("rss_mb", 6, "{:.0f}"),
        ("rss_peak_mb", 11, "{:.0f}"),
        ("max_abs_diff", 12, "{}"),
        ("mean_abs_diff", 13, "{:.3f}"),
        ("dec", 6, "{:.0f}"),
        ("dec_vs_loop", 11, "{:.2f}"),
        ("cpu_dec", 7, "{:.2f}"),
        ("dec_max_diff", 12, "{}"),
        ("dec_mean_diff", 13, "{:.3f}"),
        ("dec_fallbacks", 13, "{}"),
        ("dec_check", 9, "{}"),
    ]
    if not any("dec" in r for r in rows):
        cols = [c for c in cols if not c[0].startswith("dec") and c[0] != "cpu_dec"]
    print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w, _) in enumerate(cols)))
    for r in rows:
        cells = []
        for i, (c, w, f) in enumerate(cols):
            text = "-" if r.get(c) is None else f.format(r[c])
            cells.append(text.ljust(w) if i == 0 else text.rjust(w))
        print("  ".join(cells) + (f"  # {r['note']}" if r.get("note") else ""))
    print(
        "medians of `samples` interleaved runs (--repeats, more for small slides); ours = iter_batches, "
        "2 workers; loop = read_region loop, 2 threads (baseline "
        "openslide, or our reader's generic read_region where OpenSlide cannot read the levels); ceiling = each "
        "stored tile the grid touches decoded once on 2 threads, in patch-equivalents/s; patches/s at 224 px; "
        "cpu_* = CPU ms per patch (all threads), cpu_resize = of ours the area resize alone (area_resize), "
        "cpu_resize_cv2 = of the loop's (cv2 INTER_AREA; the same pixels); "
        "rss_mb = largest RSS growth while streaming, rss_peak_mb = peak RSS "
        "of the bench process so far; *_abs_diff = |ours - "
        "OpenSlide| over the first 100 patches (DICOM: OpenSlide skips the YCbCr->RGB conversion of these "
        "mislabelled frames, our reader does not; fractional-downsample levels: nearest level pixel vs "
        "OpenSlide's sub-pixel resampling); dec* (with --decoder) = ours through that batch tile decoder: "
        "patches/s, / loop, CPU ms a patch, |dec - ours| over the first 100 patches, tiles it handed back to "
        "the CPU path, its verdict on the slide's stream layouts (ok, or NO layout (max/mean difference of "
        "its pixels): those tiles read on the CPU)"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one repeat, at most 2,000 patches per slide")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-patches", type=int, default=None)
    ap.add_argument("--only", default=None, help="run only slides whose name contains this text")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    ap.add_argument(
        "--breakdown", action="store_true", help="only print where one patch's CPU time goes, per slide (1 thread)"
    )
    ap.add_argument("--resize", action="store_true", help="only compare ways to area-resize one patch (CPU ms, pixels)")
    ap.add_argument(
        "--decoder",
        default="cpu",
        choices=TILE_DECODERS,
        help="also stream through this batch tile decoder (nvimgcodec: a GPU), interleaved: the dec* columns",
    )
    args = ap.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    max_patches = args.max_patches or (2000 if args.quick else None)
    cv2.setNumThreads(1)  # the benchmark compares reader threads, not OpenCV's own pool
    if args.resize:
        for read in (245, 256, 280, 336, 448, 512):
            for row in resize_candidates(read, 224):
                print(
                    f"{row['resize']:9s} {row['way']:38s} {row['cpu_ms']:.3f} ms  max {row['max']:3d}  "
                    f"mean {row['mean']:.4f}"
                )
        print("CPU ms a patch on one thread (best of 3); max/mean = |difference| to cv2 INTER_AREA (0-255)")
        return 0

    svs_05, svs_025 = build_slide(LARGE_SIDE, 0.5, 2, "svs"), build_slide(12_000, 0.25, 4, "svs")
    ndpi = SLIDES / "test3-DAPI-2-387.ndpi"
    # (name, slide, µm/px override, grid µm/px): 0.5 = 224 px patches at 0.5 µm/px; FIELD_MPP = the released
    # mSTAR/UNI field of view (128 µm in 224 px), which every real-weight bundle tiles at (256 px read at 0.5)
    slides: list[tuple[str, Path | None, float | None, float]] = [
        ("JPEG SVS 0.5", svs_05, None, 0.5),
        ("JPEG SVS 0.5, 128 µm", svs_05, None, FIELD_MPP),
        ("JPEG SVS 0.25 (4x)", svs_025, None, 0.5),
        ("JPEG SVS 0.25 (4x), 128 µm", svs_025, None, FIELD_MPP),
        ("NDPI", ndpi, None, 0.5),
        ("NDPI, 128 µm", ndpi, None, FIELD_MPP),
        ("NDPI built, 16k", build_ndpi(), None, 0.5),
        ("NDPI built, 16k, 128 µm", build_ndpi(), None, FIELD_MPP),
        ("NDPI built, 16k, 2,048 px intervals", build_ndpi(interval_mcus=256), None, 0.5),
        ("NDPI built, 16k, 2,048 px intervals, 128 µm", build_ndpi(interval_mcus=256), None, FIELD_MPP),
        ("JPEG2000 SVS (0.25)", SLIDES / "tcga-cr-7395-01a-01-ts1.svs", 0.25, 0.5),
        ("JPEG2000 YCbCr 33003", build_j2k_ycbcr() if shutil.which("opj_compress") else None, None, 0.5),
        (
            "JPEG2000 YCbCr 33003 wide",
            build_j2k_ycbcr(20_480, 2_048) if shutil.which("opj_compress") else None,
            None,
            0.5,
        ),
        ("DICOM", SLIDES / "dicom-cmu-1-small-region", None, 0.5),
        ("OME-TIFF", build_slide(8_000, 0.5, 2, "ome"), None, 0.5),
        ("MRXS", build_mirax(8_000), None, 0.5),
        ("MRXS" + GENERIC, build_mirax(8_000), None, 0.5),
    ]
    resize_patch(np.zeros((245, 245, 3), np.uint8), 224)  # numba compiles (or loads) area_resize before any timer
    keep_freed_memory()  # as iter_batches does in the service: every column runs under the same malloc settings
    rows = []
    for name, path, override, target_mpp in slides:
        if args.only and args.only.lower() not in name.lower():
            continue
        if path is None:
            print(f"# {name}: skipped, opj_compress (Debian libopenjp2-tools) builds it", flush=True)
            continue
        if args.breakdown:
            if name.endswith(GENERIC):
                continue  # the breakdown splits the fast path's time
            with open_slide(path, mpp_override=override) as reader:
                grid = build_grid(reader, target_mpp=target_mpp)
            if max_patches is not None and len(grid) > max_patches:
                grid = _subset(grid, max_patches)
            parts = breakdown(path, grid, override, repeats)
            text = "  ".join(f"{k} {v:.3f}" for k, v in parts.items()) or "no tile fast path (generic read_region)"
            print(f"{name:22s} {len(grid):5d} patches  {text}")
            continue
        fast = False if name.endswith(GENERIC) else "auto"
        row = bench_slide(name, path, override, repeats, max_patches, target_mpp, fast, args.decoder)
        rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    if args.breakdown:
        print(
            "CPU ms a patch on one thread, best of the repeats (ours_cold = decode_once + cut + resize + other; "
            "resize = area_resize, resize_cv2 = the loop's; best_ratio = (openslide_read + resize_cv2) / "
            "(decode_once + resize), what a reader doing nothing but decode each tile once and resize reaches)"
        )
        return 0
    print()
    print_table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
