"""Patch-encoder throughput, side by side in one run: PyTorch eager vs ONNX Runtime vs Triton (gRPC).

Same model, same uint8 batch, same thread budget; prints patches/s and ratios against PyTorch eager (timing
on a shared 2-core machine is noisy, which is why only ratios measured together are reported).

    .venv/bin/python bench/encoder.py                       # vit_tiny_224, batch 16
    .venv/bin/python bench/encoder.py --model vit_small_224 --batch 32 --iters 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _rate(fn, batch: int, iters: int) -> float:
    fn()  # warm-up (allocations, lazy init)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_tiny_224", help="training.models.patch_encoder.PATCH_ENCODERS key")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-triton", action="store_true", help="skip the Triton server leg")
    args = ap.parse_args()

    import torch

    from service.inference.ort_backend import OrtBackend
    from training.export.bundle import build_bundle
    from training.export.wrappers import U8PatchEncoder
    from training.models.patch_encoder import PATCH_ENCODERS, build_patch_encoder

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    encoder, pre = build_patch_encoder(args.model)
    spec = PATCH_ENCODERS[args.model]
    rng = np.random.default_rng(0)
    px = rng.integers(0, 256, (args.batch, pre.size, pre.size, 3), dtype=np.uint8)
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="mstar-bench-") as tmp:
        print(f"exporting {args.model} ({pre.size}px, {spec.embed_dim}-d) ...", file=sys.stderr)
        rep = build_bundle(
            Path(tmp) / "b",
            encoder=encoder,
            patch_size=pre.size,
            embed_dim=spec.embed_dim,
            mean=pre.mean,
            std=pre.std,
            name="bench",
            demo=True,
        )
        bundle = rep.bundle
        wrapped = U8PatchEncoder(encoder, pre.mean, pre.std).eval()
        x = torch.from_numpy(px)

        def torch_eager() -> None:
            with torch.inference_mode():
                wrapped(x)

        results["pytorch_eager"] = _rate(torch_eager, args.batch, args.iters)
        ort_b = OrtBackend(bundle, device="cpu", intra_op_threads=args.threads, max_chunk=args.batch)
        results["onnxruntime"] = _rate(lambda: ort_b.embed_patches(px), args.batch, args.iters)
        ref = ort_b.embed_patches(px)
        if not args.no_triton:
            from triton_launcher import TritonServer  # tests/triton_launcher.py (on sys.path above)

            from service.inference.triton_backend import TritonBackend
            from training.export.triton import write_repository

            write_repository(bundle, intra_op_threads=args.threads)
            with (
                TritonServer(bundle.root, startup_timeout_s=180) as srv,
                TritonBackend(bundle, srv.grpc_url, max_chunk=args.batch) as tb,
            ):
                results["triton_grpc"] = _rate(lambda: tb.embed_patches(px), args.batch, args.iters)
                diff = float(np.abs(tb.embed_patches(px) - ref).max())
                print(f"triton vs onnxruntime max abs diff: {diff:.2e}", file=sys.stderr)
    base = results["pytorch_eager"]
    print(f"\npatch encoder {args.model}, batch {args.batch}, {args.threads} threads, median of {args.iters}")
    print(f"{'runtime':<16}{'patches/s':>12}{'vs eager':>10}")
    for k, v in results.items():
        print(f"{k:<16}{v:>12.1f}{v / base:>9.2f}x")
    print(
        json.dumps(
            {
                "model": args.model,
                "batch": args.batch,
                "patches_per_s": results,
                "ratio_vs_eager": {k: v / base for k, v in results.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
