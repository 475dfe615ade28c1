"""ViT-L/16 patch-encoder throughput on a GPU: PyTorch bf16 vs ONNX Runtime CUDA vs TensorRT FP16, one command.

For each runtime: patches/s over a batch sweep, and the embedding cosine against an FP32 reference on the same
batch (TRT FP16 can break ViT LayerNorms; this is the release gate). Then slide -> features end to end: the
service's own `embed_grid` (reader threads decoding ahead while the best runtime embeds) on a real slide,
against reading alone and the encoder alone at that batch. Runtimes that are not available here (no GPU, an
onnxruntime without the CUDA/TensorRT EPs) are skipped with a message, never an error; so is whatever would
run past `--budget-s`, so the script always ends with its table inside the time it was given.

    bash bench/gpu/run.sh                                  # installs from the lock, then this under 8 minutes
    python bench/gpu/encoder_gpu.py                        # mstar_vit_l16, batches 16-256, random weights
    python bench/gpu/encoder_gpu.py --checkpoint mSTAR.pth # the released weights (local file)
    python bench/gpu/encoder_gpu.py --dry-run              # CPU, a micro ViT: checks the script end to end
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
DEFAULT_SLIDE = ROOT.parent / "shared/data/slides/CMU-1-Small-Region.svs"


def _time(fn, iters: int, sync=lambda: None) -> float:
    fn()
    sync()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)).min())


class Budget:
    """The wall-clock allowance of the whole run: a step that would start after it is skipped and named."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.skipped: list[str] = []

    def allows(self, step: str) -> bool:
        if time.monotonic() < self.deadline:
            return True
        print(f"skip {step}: time budget spent")
        self.skipped.append(step)
        return False


def _ort_legs(tmp: str, size: int, max_batch: int, dry_run: bool, cuda: bool) -> list[tuple[str, str, list]]:
    """(name, the provider it needs, providers) for each onnxruntime leg."""
    trt = {
        "trt_fp16_enable": True,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": tmp,
        "trt_profile_min_shapes": f"pixels_u8:1x{size}x{size}x3",
        "trt_profile_opt_shapes": f"pixels_u8:{max_batch}x{size}x{size}x3",
        "trt_profile_max_shapes": f"pixels_u8:{max_batch}x{size}x{size}x3",
    }
    legs = [
        ("ort_cuda_fp32", "CUDAExecutionProvider", [("CUDAExecutionProvider", {})]),
        (
            "tensorrt_fp16",
            "TensorrtExecutionProvider",
            [("TensorrtExecutionProvider", trt), ("CUDAExecutionProvider", {})],
        ),
    ]
    if dry_run or not cuda:
        legs.append(("ort_cpu_fp32", "CPUExecutionProvider", ["CPUExecutionProvider"]))
    return legs


def end_to_end(slide: Path, session, size: int, batch: int, workers: int, iters: int) -> dict:
    """Slide -> features through the service's loop: reading alone, the encoder alone, both together."""
    from service.embedding import EmbedStats, embed_grid
    from service.slides.grid import build_grid
    from service.slides.open import open_slide
    from service.slides.stream import iter_batches

    def encode(px: np.ndarray) -> np.ndarray:
        return session.run(["embedding"], {"pixels_u8": px})[0]

    with open_slide(slide) as reader:
        grid = build_grid(reader, target_mpp=0.5, patch_size=size)
        n = len(grid)
        dim = encode(np.zeros((1, size, size, 3), np.uint8)).shape[1]

        def read_all() -> None:
            for _ in iter_batches(reader, grid, batch_size=batch, workers=workers):
                pass

        held = []  # up to 8 batches in memory: the encoder alone, without the reader
        for patches, _ in iter_batches(reader, grid, batch_size=batch, workers=workers):
            held.append(patches)
            if len(held) == 8:
                break
        stats: list[EmbedStats] = []

        def embed_all() -> None:
            st = EmbedStats()
            feats = embed_grid(reader, grid, encode, dim, batch_size=batch, workers=workers, stats=st)
            assert feats.shape == (n, dim) and np.isfinite(feats).all()
            stats.append(st)

        read_s = _time(read_all, iters)
        enc_s = _time(lambda: [encode(p) for p in held], iters)
        both_s = _time(embed_all, iters)
    waiting = statistics.median(s.wait_s / s.total_s for s in stats if s.total_s > 0)
    return {
        "slide": slide.name,
        "patches": n,
        "batch": batch,
        "decode_workers": workers,
        "read_per_s": n / read_s,
        "encoder_per_s": sum(map(len, held)) / enc_s,
        "end_to_end_per_s": n / both_s,
        "encoder_waiting": waiting,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mstar_vit_l16")
    ap.add_argument("--checkpoint", default=None, help="local state dict (mSTAR/UNI layout); default random init")
    ap.add_argument("--batches", default="16,64,128,256", help="batch sizes of the sweep, comma-separated")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--slide", type=Path, default=DEFAULT_SLIDE, help="slide for the end-to-end leg ('' skips it)")
    ap.add_argument("--e2e-batch", type=int, default=128)
    ap.add_argument("--decode-workers", type=int, default=min(8, os.cpu_count() or 2))
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting new steps after this many seconds")
    ap.add_argument("--dry-run", action="store_true", help="CPU only, vit_micro_112, batches 2 and 4, 2 iterations")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    budget = Budget(args.budget_s)
    if args.dry_run:
        args.model, args.batches, args.iters, args.e2e_batch, args.decode_workers = "vit_micro_112", "2,4", 2, 4, 2
    batches = sorted({int(b) for b in args.batches.split(",") if b.strip()})

    import onnxruntime as ort
    import torch

    from training.export.onnx import export_onnx
    from training.export.wrappers import U8PatchEncoder
    from training.models.patch_encoder import build_patch_encoder

    cuda = torch.cuda.is_available() and not args.dry_run
    dev = "cuda" if cuda else "cpu"
    where = torch.cuda.get_device_name(0) if cuda else "cpu (" + ("dry run" if args.dry_run else "no GPU") + ")"
    print(f"device: {where}")
    print(f"onnxruntime {ort.__version__} providers: {ort.get_available_providers()}")
    torch.manual_seed(0)
    encoder, pre = build_patch_encoder(args.model, args.checkpoint)
    wrapped = U8PatchEncoder(encoder, pre.mean, pre.std).eval().to(dev)
    rng = np.random.default_rng(0)
    px = rng.integers(0, 256, (max(batches), pre.size, pre.size, 3), dtype=np.uint8)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows: dict[str, dict] = {}

    # FP32 reference on the largest batch: every runtime's cosine is taken on the same pixels
    with torch.inference_mode():
        ref = wrapped(torch.from_numpy(px).to(dev)).float().cpu().numpy()

    # PyTorch: bf16 autocast on the GPU; on the CPU only fp32 eager is meaningful
    name = "pytorch_bf16" if cuda else "pytorch_fp32_cpu"
    if not cuda:
        print("skip pytorch_bf16: no CUDA device; timing fp32 eager on the CPU instead")
    row: dict = {"batches": {}}
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        wrapped(torch.from_numpy(px).to(dev))  # warm-up: kernels, thread pools, allocator
    for b in batches:
        if not budget.allows(f"{name} batch {b}"):
            continue
        x = torch.from_numpy(px[:b]).to(dev)

        def torch_run(x=x):
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                return wrapped(x)

        row["batches"][str(b)] = b / _time(torch_run, args.iters, sync)
        if b == max(batches):
            row["cosine_vs_fp32"] = _cos(torch_run().float().cpu().numpy(), ref)
    rows[name] = row
    wrapped.cpu()

    avail = set(ort.get_available_providers())
    best_session = None
    with tempfile.TemporaryDirectory(prefix="mstar-gpu-bench-") as tmp:
        onnx_path = Path(tmp) / "encoder.onnx"
        print(f"exporting {args.model} to ONNX (dynamo) ...")
        export_onnx(
            wrapped,
            (torch.from_numpy(px[:2]),),
            onnx_path,
            input_names=["pixels_u8"],
            output_names=["embedding"],
            dynamic_axes={0: {0: ("batch", 1, 4096)}},
        )
        for name, need, providers in _ort_legs(tmp, pre.size, max(batches), args.dry_run, cuda):
            if need not in avail:
                print(f"skip {name}: onnxruntime has no {need} (install onnxruntime-gpu with CUDA/TensorRT)")
                continue
            if not budget.allows(name):
                continue
            try:
                sess = ort.InferenceSession(str(onnx_path), providers=providers)
                if need not in sess.get_providers():
                    print(f"skip {name}: {need} failed to initialise (got {sess.get_providers()})")
                    continue
                t0 = time.perf_counter()
                out = sess.run(["embedding"], {"pixels_u8": px})[0]  # the first call builds the TRT engine
                row = {"first_call_s": time.perf_counter() - t0, "cosine_vs_fp32": _cos(out, ref), "batches": {}}
                for b in batches:
                    if budget.allows(f"{name} batch {b}"):
                        run = lambda s=sess, p=px[:b]: s.run(["embedding"], {"pixels_u8": p})[0]  # noqa: E731
                        row["batches"][str(b)] = b / _time(run, args.iters)
                rows[name] = row
                best_session = (name, sess)  # legs run slowest-first: the last that worked is the fastest kind
            except Exception as err:  # a broken EP install must not hide the other legs
                print(f"skip {name}: {type(err).__name__}: {err}")

        e2e = None
        if not str(args.slide) or not args.slide.exists():
            print(f"skip end_to_end: no slide at {args.slide!s}")
        elif best_session is None:
            print("skip end_to_end: no onnxruntime leg ran")
        elif budget.allows("end_to_end"):
            e2e = end_to_end(args.slide, best_session[1], pre.size, args.e2e_batch, args.decode_workers, args.iters)
            e2e["runtime"] = best_session[0]

    base_name = next(iter(rows))  # PyTorch (bf16 on a GPU, fp32 on the CPU): the ratios' denominator
    print(f"\n{args.model}, median of {args.iters}; patches/s per batch size, x {base_name} at the same batch")
    print(f"{'runtime':<18}" + "".join(f"{'b=' + str(b):>16}" for b in batches) + f"{'cosine vs fp32':>16}")
    for k, v in rows.items():
        cells = []
        for b in batches:
            pps, base = v["batches"].get(str(b)), rows[base_name]["batches"].get(str(b))
            cells.append(f"{pps:>8.1f} ({pps / base:4.2f}x)" if pps and base else f"{'-':>16}")
        cos = v.get("cosine_vs_fp32")
        print(f"{k:<18}" + "".join(f"{c:>16}" for c in cells) + (f"{cos:>16.6f}" if cos is not None else f"{'-':>16}"))
    if e2e is not None:
        print(
            f"\nslide -> features ({e2e['runtime']}, {e2e['slide']}, {e2e['patches']} patches, batch {e2e['batch']}, "
            f"{e2e['decode_workers']} decode workers): read {e2e['read_per_s']:.0f}/s, encoder "
            f"{e2e['encoder_per_s']:.0f}/s, end to end {e2e['end_to_end_per_s']:.0f}/s "
            f"({e2e['end_to_end_per_s'] / min(e2e['read_per_s'], e2e['encoder_per_s']):.2f} of the slower side), "
            f"encoder waiting {e2e['encoder_waiting']:.0%}"
        )
    doc = {
        "model": args.model,
        "batches": batches,
        "device": dev,
        "baseline": base_name,
        "results": rows,
        "end_to_end": e2e,
        "skipped_for_time": budget.skipped,
    }
    print(json.dumps(doc))
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
