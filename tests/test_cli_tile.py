"""`mstar tile` through click's runner and once as a real subprocess of the installed console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
from click.testing import CliRunner

from service.cli import main
from service.slides.h5io import read_h5

ROOT = Path(__file__).resolve().parents[1]


def test_tile_writes_h5_and_preview(cmu_svs: Path, tmp_path: Path) -> None:
    out, png = tmp_path / "cmu.h5", tmp_path / "cmu.png"
    res = CliRunner().invoke(main, ["tile", str(cmu_svs), "--out", str(out), "--thumbnail", str(png)])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output.strip().splitlines()[-1])
    coords, feats, attrs = read_h5(out)
    assert feats is None and summary["patches"] == len(coords) > 0
    assert attrs["patch_size"] == 224 and attrs["patch_size_level0"] == 224
    assert attrs["mpp_source"] == "aperio"
    assert attrs["name"] == "CMU-1-Small-Region"
    img = cv2.imread(str(png))
    assert img is not None and max(img.shape[:2]) == 1024
    # The contour (green) and patch boxes (blue) are drawn.
    b, g, r = img[:, :, 0].astype(int), img[:, :, 1].astype(int), img[:, :, 2].astype(int)
    assert ((g > 150) & (r < 60) & (b < 60)).sum() > 100
    assert ((b > 200) & (r < 60) & (g < 120)).sum() > 100


def test_tile_options(ndpi: Path, tmp_path: Path) -> None:
    out = tmp_path / "n.h5"
    args = [
        "tile",
        str(ndpi),
        "--out",
        str(out),
        "--mpp",
        "1.0",
        "--patch-size",
        "128",
        "--overlap",
        "32",
        "--tissue-threshold",
        "0.5",
    ]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    coords, _, attrs = read_h5(out)
    assert attrs["patch_size"] == 128 and attrs["overlap"] == 32 and attrs["tissue_threshold"] == 0.5
    assert abs(attrs["effective_mpp"] - 1.0) < 0.02 and attrs["read_level"] == 2  # 0.2282 x 4 = 0.913
    steps = np.diff(np.unique(coords[:, 0]))
    assert steps.min() == attrs["step_size_level0"] < attrs["patch_size_level0"]


def test_refusals_are_one_line_and_nonzero(tcga_j2k_svs: Path, cmu_svs: Path, bad_dicom: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    cases = [
        ([str(tcga_j2k_svs)], "missing_mpp"),
        ([str(cmu_svs), "--mpp", "0.2"], "invalid_parameter"),  # would need upsampling
        ([str(cmu_svs), "--overlap", "300"], "invalid_parameter"),
        ([str(bad_dicom)], ""),
        ([str(tmp_path / "no-such.svs")], "slide_not_found"),  # was click's multi-line usage error
    ]
    for extra, code in cases:
        res = runner.invoke(main, ["tile", *extra, "--out", str(tmp_path / "x.h5")])
        assert res.exit_code == 2, (extra, res.output)
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error [") and code in lines[0], res.output
        assert "Traceback" not in res.output
    assert not (tmp_path / "x.h5").exists()
    res = runner.invoke(main, ["tile", str(tcga_j2k_svs), "--mpp-override", "0.25", "--out", str(tmp_path / "t.h5")])
    assert res.exit_code == 0, res.output
    assert read_h5(tmp_path / "t.h5")[2]["mpp_source"] == "override"


def test_console_script_subprocess(dicom_dir: Path, tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("mstar")
    if not exe.exists():
        exe = ROOT / ".venv" / "bin" / "mstar"
    out = tmp_path / "d.h5"
    proc = subprocess.run(
        [str(exe), "tile", str(dicom_dir), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["vendor"] == "dicom" and summary["patches"] == len(read_h5(out)[0]) > 0


def test_analyze_of_a_missing_slide_is_one_line_before_any_bundle_build(tmp_path: Path) -> None:
    """`mstar analyze` of a path that does not exist: the one-line `slide_not_found` the README promises (it was
    click's multi-line usage error), before the demo bundle's first-use build could start."""
    res = CliRunner().invoke(main, ["analyze", str(tmp_path / "no-such.svs"), "--out", str(tmp_path / "out")])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error [slide_not_found]"), res.output
    assert not (tmp_path / "out").exists()
