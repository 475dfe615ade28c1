"""The GPU benchmark script runs end to end on the CPU (`--dry-run`), so a GPU session only has to run it.

It cannot time bf16, ORT CUDA or TensorRT here, but it exercises the same export, session set-up, parity check
and report code that those legs use.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_encoder_gpu_bench_dry_run(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, "bench/gpu/encoder_gpu.py", "--dry-run", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["device"] == "cpu" and doc["baseline"] == "pytorch_fp32_cpu"
    rows = doc["results"]
    assert set(rows) >= {"pytorch_fp32_cpu", "ort_cpu_fp32"}
    # the exported graph (uint8 in, normalisation inside) embeds like the eager model
    assert rows["ort_cpu_fp32"]["cosine_vs_fp32"] >= 0.9999
    assert rows["ort_cpu_fp32"]["patches_per_s"] > 0
    assert rows["pytorch_fp32_cpu"]["ratio_vs_pytorch_fp32_cpu"] == 1.0
    assert "skip pytorch_bf16" in proc.stdout
