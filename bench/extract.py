"""Patches/s of `mstar extract` (extract_slide: reader thread pool + bounded queue overlapping the model) against a
naive loop (read one patch with read_region, resize, preprocess; run the model only once a batch has been read),
on the same slides, grids and model, measured side by side in one run.

Also printed: `model_only`, the encoder alone on pre-decoded patches, and `decode_only`, the naive reads alone;
with overlap, `ours` approaches min(model_only, decode_only) throughput, while the naive loop pays for both.

    .venv/bin/python bench/extract.py [--encoder vit_micro_112] [--workers 2] [--accelerator-ms 150]

On a CPU-only machine the encoder and the decoder threads share the same cores, so overlap gains little; with
`--accelerator-ms MS` the encoder is replaced by an emulated accelerator (waits MS per batch without using the
CPU, returns zeros), which is the situation the overlap is built for (GPU inference, CPU decoding).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.slides.grid import build_grid  # noqa: E402
from service.slides.mpp import override_mpp  # noqa: E402
from service.slides.open import open_slide  # noqa: E402
from service.slides.stream import resize_patch  # noqa: E402
from training.extract import embed_batch, extract_slide, load_encoder  # noqa: E402

SLIDES = ROOT.parent / "shared" / "data" / "slides"
DEFAULT = ["CMU-1-Small-Region.svs", "test3-DAPI-2-387.ndpi", "tcga-cr-7395-01a-01-ts1.svs"]


class _EmulatedAccelerator(torch.nn.Module):
    """Stands in for a GPU encoder: per-batch latency that does not use the CPU (label: emulated)."""

    def __init__(self, ms: float, dim: int) -> None:
        super().__init__()
        self.ms, self.dim = ms, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.ms / 1000)
        return torch.zeros(x.shape[0], self.dim)


def naive(reader, grid, encoder, batch_size: int, decode_only: bool = False) -> float:
    t0 = time.perf_counter()
    buf: list[np.ndarray] = []
    feats = []
    for x, y in grid.coords:
        region = reader.read_region((int(x), int(y)), grid.read_level, (grid.read_size, grid.read_size))
        buf.append(resize_patch(region, grid.patch_size))
        if len(buf) == batch_size:
            if not decode_only:
                feats.append(embed_batch(encoder, np.stack(buf)))
            buf = []
    if buf and not decode_only:
        feats.append(embed_batch(encoder, np.stack(buf)))
    return time.perf_counter() - t0


def model_only(grid, encoder, batch_size: int) -> float:
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 255, (batch_size, grid.patch_size, grid.patch_size, 3), dtype=np.uint8)
    t0 = time.perf_counter()
    for start in range(0, len(grid), batch_size):
        embed_batch(encoder, batch[: min(batch_size, len(grid) - start)])
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoder", default="vit_micro_112")
    ap.add_argument("--patch-size", type=int, default=224)
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--slides", nargs="*", default=DEFAULT)
    ap.add_argument("--accelerator-ms", type=float, default=None, help="emulated accelerator latency per batch")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    enc = load_encoder(args.encoder)
    if args.accelerator_ms is not None:
        enc.model = _EmulatedAccelerator(args.accelerator_ms, enc.embed_dim)
        args.encoder = f"emulated accelerator ({args.accelerator_ms:g} ms/batch)"
    rows = []
    tot = {"n": 0, "ours": 0.0, "naive": 0.0, "model": 0.0, "decode": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.slides:
            path = SLIDES / name
            with open_slide(path) as reader:
                if reader.mpp is None:
                    reader.mpp = override_mpp(0.5)  # the J2K TCGA crop has no µm/px (MANIFEST); assume 20x
                grid = build_grid(reader, target_mpp=args.mpp, patch_size=args.patch_size)
                embed_batch(enc, np.zeros((2, args.patch_size, args.patch_size, 3), np.uint8))  # warm-up
                t_naive = naive(reader, grid, enc, args.batch_size)
                t0 = time.perf_counter()
                extract_slide(
                    reader,
                    enc,
                    Path(tmp) / f"{path.stem}.h5",
                    grid=grid,
                    batch_size=args.batch_size,
                    workers=args.workers,
                )
                t_ours = time.perf_counter() - t0
                t_model = model_only(grid, enc, args.batch_size)
                t_decode = naive(reader, grid, enc, args.batch_size, decode_only=True)
            n = len(grid)
            rows.append((name, n, n / t_naive, n / t_ours, n / t_model, n / t_decode, t_naive / t_ours))
            for k, v in (("n", n), ("ours", t_ours), ("naive", t_naive), ("model", t_model), ("decode", t_decode)):
                tot[k] += v
    print(
        f"encoder={args.encoder} patch={args.patch_size}px mpp={args.mpp} batch={args.batch_size} "
        f"reader threads={args.workers} torch threads={torch.get_num_threads()}"
    )
    print(
        f"{'slide':34s} {'patches':>7s} {'naive/s':>9s} {'ours/s':>9s} {'model/s':>9s} {'decode/s':>9s} "
        f"{'ours÷naive':>10s}"
    )
    for r in rows:
        print(f"{r[0]:34s} {r[1]:7d} {r[2]:9.1f} {r[3]:9.1f} {r[4]:9.1f} {r[5]:9.1f} {r[6]:10.2f}")
    n = tot["n"]
    print(
        f"{'ALL':34s} {n:7d} {n / tot['naive']:9.1f} {n / tot['ours']:9.1f} {n / tot['model']:9.1f} "
        f"{n / tot['decode']:9.1f} {tot['naive'] / tot['ours']:10.2f}"
    )


if __name__ == "__main__":
    main()
