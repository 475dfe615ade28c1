"""End-to-end benchmark: does reading overlap inference? `mstar analyze` with the demo bundle against reading
alone and inference alone, on the same slide, in one run.

Run: `.venv/bin/python bench/analyze.py [--repeats 3] [--bundle model_repository] [--slide PATH]`

The slide is an Aperio-style JPEG SVS of mirrored real pixels, >= `--side` px (10,000 by default; built by
bench/tiling.py's builder and cached under out/bench/ on first use). With the demo bundle's patch size and µm/px,
each repeat measures, interleaved:
- read: `iter_batches` alone (2 reader threads), patches/s;
- infer: the patch encoder alone (`backend.embed_patches`) on batches already in memory, patches/s;
- embed: `service.embedding.embed_grid` (reading and inference together, as analyze and extract run them),
  patches/s, and the share of its time the encoder sat waiting for patches;
- analyze: `run_analysis` end to end (what `mstar analyze` runs: open, grid, embed, aggregator, heads, report,
  heatmap, files), seconds and its embed-stage patches/s.
`overlap` = embed / min(read, infer): 1.0 means the slower side sets the pace and the other is hidden;
`serial` = embed / (1 / (1/read + 1/infer)): above 1 means better than reading then inferring one after the other.
On 2 cores the two sides share the CPU, so the ceiling is below min(read, infer) whenever both are CPU-bound.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))  # after ROOT: bench/service.py must not shadow the package

from service.embedding import EmbedStats, embed_grid  # noqa: E402
from service.inference.bundle import load_bundle  # noqa: E402
from service.inference.ort_backend import OrtBackend  # noqa: E402
from service.pipeline import AnalysisOptions, run_analysis  # noqa: E402
from service.slides.grid import build_grid  # noqa: E402
from service.slides.open import open_slide  # noqa: E402
from service.slides.stream import iter_batches  # noqa: E402


def measure(slide: Path, bundle_dir: Path, batch_size: int, workers: int, infer_patches: int) -> dict:
    bundle = load_bundle(bundle_dir)
    pre = bundle.manifest.preprocessing
    dim = bundle.manifest.embed_dim
    row: dict = {}
    with OrtBackend(bundle, device="cpu") as be, open_slide(slide) as reader:
        grid = build_grid(reader, target_mpp=pre.target_mpp, patch_size=pre.patch_size)
        n = len(grid)
        row.update(patches=n, patch_size=pre.patch_size, read_size=grid.read_size)

        t0 = time.perf_counter()
        for _ in iter_batches(reader, grid, batch_size=batch_size, workers=workers):
            pass
        row["read"] = n / (time.perf_counter() - t0)

        held = []
        for b, _ in iter_batches(reader, grid, batch_size=batch_size, workers=workers):
            held.append(b)
            if sum(len(x) for x in held) >= infer_patches:
                break
        be.embed_patches(held[0])  # warm-up (session set-up, allocator)
        t0 = time.perf_counter()
        for b in held:
            be.embed_patches(b)
        row["infer"] = sum(len(x) for x in held) / (time.perf_counter() - t0)

        stats = EmbedStats()
        feats = embed_grid(reader, grid, be.embed_patches, dim, batch_size=batch_size, workers=workers, stats=stats)
        assert feats.shape == (n, dim) and np.isfinite(feats).all()
        row["embed"] = stats.patches_per_s
        row["encoder_waiting"] = stats.wait_s / stats.total_s

        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            res = run_analysis(
                slide,
                tmp,
                AnalysisOptions(batch_size=batch_size, read_workers=workers),
                backend=be,
            )
            row["analyze_s"] = time.perf_counter() - t0
            row["analyze_embed"] = res["timings"].get("patches_per_s")
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bundle", type=Path, default=ROOT / "model_repository")
    ap.add_argument("--slide", type=Path, default=None)
    ap.add_argument("--side", type=int, default=10_000, help="side of the built Aperio-style slide (no --slide)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--infer-patches", type=int, default=2048, help="patches held in memory for 'infer'")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    cv2.setNumThreads(1)
    if args.slide is None:
        from tiling import build_slide

        args.slide = build_slide(args.side, 0.5, 2, "svs")
    from service.errors import BundleError

    try:
        load_bundle(args.bundle)
    except BundleError as exc:
        print(f"no usable bundle at {args.bundle} ({exc}): build the demo bundle first (`mstar analyze` does)")
        return 2
    rows = [
        measure(args.slide, args.bundle, args.batch_size, args.workers, args.infer_patches) for _ in range(args.repeats)
    ]
    for r in rows:
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if isinstance(rows[0][k], int | float)}
    serial = 1.0 / (1.0 / med["read"] + 1.0 / med["infer"])
    print()
    print(
        f"slide {args.slide.name}: {med['patches']:.0f} patches of {rows[0]['patch_size']} px, medians of {len(rows)}"
    )
    heads = ("read", "infer", "embed", "overlap", "serial", "waiting", "analyze_s", "analyze/s")
    print(" ".join(f"{h:>9}" for h in heads))
    values = (
        f"{med['read']:.0f}",
        f"{med['infer']:.0f}",
        f"{med['embed']:.0f}",
        f"{med['embed'] / min(med['read'], med['infer']):.2f}",
        f"{med['embed'] / serial:.2f}",
        f"{med['encoder_waiting']:.2f}",
        f"{med['analyze_s']:.1f}",
        f"{med['analyze_embed']:.0f}",
    )
    print(" ".join(f"{v:>9}" for v in values))
    print(
        "patches/s; overlap = embed / min(read, infer); serial = embed / (1/(1/read + 1/infer)); waiting = share of "
        "embed time the encoder waited for patches; analyze = run_analysis end to end (embed-stage patches/s)"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "median": med}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
