"""Tissue mask of a JPEG slide without a pyramid: DCT-scaled tile decoding against the full decode it replaced,
measured side by side in one run, with how far the two masks differ.

Run: `.venv/bin/python bench/flat_mask.py [--side 16384] [--repeats 3]`

The slide is built once (cached under out/bench/) from mirrored real CMU-1-Small-Region pixels: one level, tiled
JPEG (256 px, quality 85), labelled 0.5 µm/px. Its mask (`tissue.tissue_mask`) reads the whole level through the
slide's thumbnail: "full" decodes every tile in full and area-shrinks it (the path before), "scaled" lets
libjpeg-turbo decode each tile at 1/8 (`fasttiles.MAX_JPEG_REDUCE`). Reported: median wall and CPU seconds of
each, their ratio, and the mean |difference| of the mask images and the share of mask pixels that differ.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.slides import fasttiles  # noqa: E402
from service.slides.open import open_slide  # noqa: E402
from service.slides.tissue import tissue_mask  # noqa: E402

SAMPLE = ROOT.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"


def build(side: int) -> Path:
    import tifffile

    path = ROOT / "out" / "bench" / f"cmu-mirror-{side}-flat-jpeg.tif"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open_slide(SAMPLE) as r:
        src = r.read_region((0, 0), 0, (2048, 2048))
    quad = np.concatenate([np.concatenate([src, src[:, ::-1]], 1), np.concatenate([src[::-1], src[::-1, ::-1]], 1)])

    def tiles():
        for ty in range(side // 256):
            for tx in range(side // 256):
                y, x = (ty * 256) % 4096, (tx * 256) % 4096
                yield quad[y : y + 256, x : x + 256]

    tmp = path.with_suffix(".part")
    tifffile.imwrite(
        tmp,
        tiles(),
        shape=(side, side, 3),
        dtype=np.uint8,
        tile=(256, 256),
        compression="jpeg",
        compressionargs={"level": 85},
        photometric="rgb",
    )
    tmp.replace(path)
    return path


def run(path: Path, most: int):
    fasttiles.MAX_JPEG_REDUCE = most
    with open_slide(path, mpp_override=0.5) as r:
        t, c = time.perf_counter(), time.process_time()
        mask = tissue_mask(r, mpp=0.5)
        return time.perf_counter() - t, time.process_time() - c, mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=16384, help="slide side in px (a multiple of 4,096)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    path = build(args.side)
    scaled_most = fasttiles.MAX_JPEG_REDUCE
    times: dict[str, list[tuple[float, float]]] = {"full": [], "scaled": []}
    masks = {}
    for _ in range(args.repeats):  # interleaved, so both see the same minutes of this machine
        for name, most in (("full", 0), ("scaled", scaled_most)):
            wall, cpu, masks[name] = run(path, most)
            times[name].append((wall, cpu))
    fasttiles.MAX_JPEG_REDUCE = scaled_most
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in times.items()}
    a, b = masks["full"], masks["scaled"]
    out = {
        "slide": f"{args.side} x {args.side}, one level, JPEG tiles",
        "full_s": {"wall": round(med["full"][0], 2), "cpu": round(med["full"][1], 2)},
        "scaled_s": {"wall": round(med["scaled"][0], 2), "cpu": round(med["scaled"][1], 2)},
        "speedup_wall": round(med["full"][0] / med["scaled"][0], 1),
        "mask_image_mean_abs_diff": round(float(np.abs(a.thumbnail.astype(int) - b.thumbnail).mean()), 3),
        "mask_pixels_differing": round(float((a.mask != b.mask).mean()), 5),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
