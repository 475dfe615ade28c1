"""ViT-L/16 patch-encoder throughput on a GPU: PyTorch bf16 vs ONNX Runtime CUDA vs TensorRT FP16, one command.

Also reports the embedding cosine of each reduced-precision runtime against an FP32 reference on the same
batch (TRT FP16 can break ViT LayerNorms; this is the release gate). Runtimes that are not available here
(no GPU, an onnxruntime without the CUDA/TensorRT EPs) are skipped with a message, never an error.

    python bench/gpu/encoder_gpu.py                        # mstar_vit_l16, batch 64, random weights
    python bench/gpu/encoder_gpu.py --checkpoint mSTAR.pth # the released weights (local file)
    python bench/gpu/encoder_gpu.py --dry-run              # CPU, a micro ViT: checks the script end to end
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

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mstar_vit_l16")
    ap.add_argument("--checkpoint", default=None, help="local state dict (mSTAR/UNI layout); default random init")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--dry-run", action="store_true", help="CPU only, vit_micro_112, batch 4, 2 iterations")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if args.dry_run:
        args.model, args.batch, args.iters = "vit_micro_112", 4, 2

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
    wrapped = U8PatchEncoder(encoder, pre.mean, pre.std).eval()
    rng = np.random.default_rng(0)
    px = rng.integers(0, 256, (args.batch, pre.size, pre.size, 3), dtype=np.uint8)
    rows: dict[str, dict] = {}

    # FP32 reference on the same batch
    with torch.inference_mode():
        ref = wrapped.to(dev)(torch.from_numpy(px).to(dev)).float().cpu().numpy()

    # PyTorch bf16 (autocast) on the GPU; on the CPU only fp32 eager is meaningful
    x = torch.from_numpy(px).to(dev)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:

        def torch_bf16():
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                return wrapped(x)

        t = _time(torch_bf16, args.iters, sync)
        rows["pytorch_bf16"] = {
            "patches_per_s": args.batch / t,
            "cosine_vs_fp32": _cos(torch_bf16().float().cpu().numpy(), ref),
        }
    else:
        print("skip pytorch_bf16: no CUDA device; timing fp32 eager on the CPU instead")

        def torch_fp32():
            with torch.inference_mode():
                return wrapped(x)

        rows["pytorch_fp32_cpu"] = {"patches_per_s": args.batch / _time(torch_fp32, args.iters), "cosine_vs_fp32": 1.0}
    wrapped.cpu()

    avail = set(ort.get_available_providers())
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
        legs = [
            ("ort_cuda_fp32", "CUDAExecutionProvider", [("CUDAExecutionProvider", {})]),
            (
                "tensorrt_fp16",
                "TensorrtExecutionProvider",
                [
                    (
                        "TensorrtExecutionProvider",
                        {
                            "trt_fp16_enable": True,
                            "trt_engine_cache_enable": True,
                            "trt_engine_cache_path": tmp,
                            "trt_profile_min_shapes": f"pixels_u8:1x{pre.size}x{pre.size}x3",
                            "trt_profile_opt_shapes": f"pixels_u8:{args.batch}x{pre.size}x{pre.size}x3",
                            "trt_profile_max_shapes": f"pixels_u8:{args.batch}x{pre.size}x{pre.size}x3",
                        },
                    ),
                    ("CUDAExecutionProvider", {}),
                ],
            ),
        ]
        if args.dry_run or not cuda:
            legs.append(("ort_cpu_fp32", "CPUExecutionProvider", ["CPUExecutionProvider"]))
        for name, need, providers in legs:
            if need not in avail:
                print(f"skip {name}: onnxruntime has no {need} (install onnxruntime-gpu with CUDA/TensorRT)")
                continue
            try:
                sess = ort.InferenceSession(str(onnx_path), providers=providers)
                if need not in sess.get_providers():
                    print(f"skip {name}: {need} failed to initialise (got {sess.get_providers()})")
                    continue
                run = lambda s=sess: s.run(["embedding"], {"pixels_u8": px})[0]  # noqa: E731
                t0 = time.perf_counter()
                out = run()  # first call builds the TRT engine
                build_s = time.perf_counter() - t0
                t = _time(run, args.iters)
                rows[name] = {
                    "patches_per_s": args.batch / t,
                    "cosine_vs_fp32": _cos(out, ref),
                    "first_call_s": build_s,
                }
            except Exception as err:  # a broken EP install must not hide the other legs
                print(f"skip {name}: {type(err).__name__}: {err}")
    print(f"\n{args.model}, batch {args.batch}, median of {args.iters}")
    base_name = next(iter(rows))  # PyTorch (bf16 on a GPU, fp32 on the CPU): the ratios' denominator
    base = rows[base_name]["patches_per_s"]
    print(f"{'runtime':<18}{'patches/s':>12}{'x ' + base_name:>22}{'cosine vs fp32':>16}")
    for k, v in rows.items():
        v["ratio_vs_" + base_name] = v["patches_per_s"] / base
        print(f"{k:<18}{v['patches_per_s']:>12.1f}{v['patches_per_s'] / base:>22.2f}{v['cosine_vs_fp32']:>16.6f}")
    doc = {"model": args.model, "batch": args.batch, "device": dev, "baseline": base_name, "results": rows}
    print(json.dumps(doc))
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
