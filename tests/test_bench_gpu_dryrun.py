"""The GPU benchmark script runs end to end on the CPU (`--dry-run`), so a GPU session only has to run it.

It cannot time bf16, ORT CUDA or TensorRT here, but it exercises the same export, session set-up, parity check,
batch sweep, slide -> features leg, time budget and report code that those legs use; and its installer is
checked against the lock and the images' install lines.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from deploy_tools import tool

ROOT = Path(__file__).resolve().parents[1]
SLIDE = ROOT.parent / "shared/data/slides/CMU-1-Small-Region.svs"


def _bench(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, "bench/gpu/encoder_gpu.py", "--dry-run", "--json", str(out), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_encoder_gpu_bench_dry_run(tmp_path: Path) -> None:
    proc, doc = _bench(tmp_path, "--slide", str(SLIDE))
    assert doc["device"] == "cpu" and doc["baseline"] == "pytorch_fp32_cpu" and doc["batches"] == [2, 4]
    rows = doc["results"]
    assert set(rows) >= {"pytorch_fp32_cpu", "ort_cpu_fp32"}
    for row in rows.values():  # the sweep: every runtime timed at every batch size
        assert set(row["batches"]) == {"2", "4"} and all(v > 0 for v in row["batches"].values())
    # the exported graph (uint8 in, normalisation inside) embeds like the eager model
    assert rows["ort_cpu_fp32"]["cosine_vs_fp32"] >= 0.9999
    assert "skip pytorch_bf16" in proc.stdout
    # slide -> features through the service's embed_grid on the real slide, with the fastest runtime that ran
    e2e = doc["end_to_end"]
    assert e2e["slide"] == SLIDE.name and e2e["patches"] > 100 and e2e["runtime"] == "ort_cpu_fp32"
    assert e2e["read_per_s"] > 0 and e2e["encoder_per_s"] > 0 and e2e["end_to_end_per_s"] > 0
    assert 0 <= e2e["encoder_waiting"] <= 1 and doc["skipped_for_time"] == []
    assert "slide -> features (ort_cpu_fp32" in proc.stdout


def test_encoder_gpu_bench_stops_starting_steps_when_its_budget_is_spent(tmp_path: Path) -> None:
    proc, doc = _bench(tmp_path, "--budget-s", "0", "--slide", str(SLIDE))
    assert doc["skipped_for_time"] == ["pytorch_fp32_cpu batch 2", "pytorch_fp32_cpu batch 4", "ort_cpu_fp32"]
    assert doc["end_to_end"] is None and "skip end_to_end: no onnxruntime leg ran" in proc.stdout


def test_gpu_bench_installer_uses_the_lock_and_the_images_install_lines() -> None:
    """run.sh installs what the trainer image installs (resolved against the lock by
    test_image_install_steps_resolve_against_the_lock), swaps in the GPU worker's pinned onnxruntime-gpu, and
    runs the bench under a hard limit above the script's own budget."""
    script = (ROOT / "bench/gpu/run.sh").read_text()
    subprocess.run([tool("shellcheck"), str(ROOT / "bench/gpu/run.sh")], check=True)
    train = (ROOT / "docker/train.Dockerfile").read_text()
    train_extras = re.search(r"requirements/lock\.txt '\.\[([a-z,]+)\]'", train)
    assert train_extras and f"-e '.[{train_extras.group(1)}]'" in script
    for constraint in ("constraints.txt", "requirements/lock.txt", "requirements/gpu-pins.txt"):
        assert f"-c {constraint}" in script
    assert re.search(r"^onnxruntime-gpu==\S+$", (ROOT / "requirements/gpu-pins.txt").read_text(), re.M)
    assert "uninstall --quiet -y onnxruntime\n" in script and "--no-deps onnxruntime-gpu" in script
    limit = int(re.search(r"limit=\$\{LIMIT_S:-(\d+)\}", script).group(1))
    budget = re.search(r'"--budget-s", type=float, default=([\d.]+)', (ROOT / "bench/gpu/encoder_gpu.py").read_text())
    assert limit <= 480 and float(budget.group(1)) < limit - 30
