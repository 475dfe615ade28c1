"""`mstar extract`: contract files on real slides, failures recorded, a really killed run resumes to the same files."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from service.slides.grid import build_grid
from service.slides.open import open_slide
from service.slides.stream import resize_patch
from training.extract import ExtractOptions, extract_cohort, extract_slide, find_slides, is_done, load_encoder
from training.stage2 import init_random_stage0

MSTAR = Path(sys.executable).parent / "mstar"
OPTS = ExtractOptions(target_mpp=1.0, patch_size=112, batch_size=32, workers=2)


@pytest.fixture(scope="module")
def stage0(tmp_path_factory) -> Path:
    return init_random_stage0("vit_micro_112", tmp_path_factory.mktemp("enc") / "stage0.pt", seed=0)


@pytest.fixture(scope="module")
def synth_cohort(tmp_path_factory) -> Path:
    from training.data.synth import SynthConfig, generate_cohort

    out = tmp_path_factory.mktemp("cohort")
    generate_cohort(out, SynthConfig(cases=5, seed=1, size=1536, workers=1))
    return out / "cohort.csv"


def _h5(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        data = {k: f[k][...] for k in f}
        data["attrs"] = {k: v for k, v in f["coords"].attrs.items() if k not in ("slide_path",)}
    return data


def test_real_slides_contract_pt_layout_and_failures(tmp_path, stage0, cmu_svs, tcga_j2k_svs, ndpi):
    src = tmp_path / "slides"
    src.mkdir()
    for p in (cmu_svs, tcga_j2k_svs, ndpi):
        (src / p.name).symlink_to(p)
    out = tmp_path / "out"
    opts = ExtractOptions(**{**OPTS.__dict__, "pt": True})
    summary = extract_cohort(src, stage0, out, options=opts)
    assert (summary["done"], summary["failed"]) == (2, 1)
    rows = list(csv.DictReader((out / "failures.csv").open()))
    assert [(r["slide_id"], r["error"]) for r in rows] == [("tcga-cr-7395-01a-01-ts1", "missing_mpp")]
    assert "--mpp-override" in rows[0]["reason"]
    assert not (out / "tcga-cr-7395-01a-01-ts1.h5").exists()

    cmu = _h5(out / "CMU-1-Small-Region.h5")
    n = cmu["coords"].shape[0]
    assert cmu["features"].shape == (n, 96) and cmu["features"].dtype == np.float32 and n > 10
    a = cmu["attrs"]
    assert a["encoder"] == "vit_micro_112" and a["embed_dim"] == 96 and a["patch_size"] == 112
    assert a["target_mpp"] == 1.0 and json.loads(a["preprocessing"])["size"] == 112
    assert len(a["encoder_sha256"]) == 64
    # the official layout: same rows, coords-only h5
    pt = torch.load(out / "pt_files" / "CMU-1-Small-Region.pt", weights_only=True)
    np.testing.assert_array_equal(pt.numpy(), cmu["features"])
    with h5py.File(out / "h5_files" / "CMU-1-Small-Region.h5", "r") as f:
        np.testing.assert_array_equal(f["coords"][...], cmu["coords"])
        assert "features" not in f

    # features are the encoder applied to the right pixels: recompute a few rows from read_region
    enc = load_encoder(stage0)
    with open_slide(cmu_svs) as r:
        g = build_grid(r, target_mpp=1.0, patch_size=112)
        np.testing.assert_array_equal(g.coords, cmu["coords"])
        rows_ = [0, n // 2, n - 1]
        patches = np.stack(
            [
                resize_patch(r.read_region(tuple(int(v) for v in g.coords[i]), g.read_level, (g.read_size,) * 2), 112)
                for i in rows_
            ]
        )
    with torch.inference_mode():
        ref = enc.model(enc.preprocessing(torch.from_numpy(patches))).numpy()
    np.testing.assert_allclose(cmu["features"][rows_], ref, atol=1e-5)

    # the J2K slide without µm/px: an override makes it work on the next run; finished slides are skipped
    again = extract_cohort(src, stage0, out, options=opts, mpp_override=0.5)
    assert (again["done"], again["skipped"], again["failed"]) == (1, 2, 0)
    assert is_done(out, "tcga-cr-7395-01a-01-ts1", pt=True)
    assert _h5(out / "tcga-cr-7395-01a-01-ts1.h5")["attrs"]["mpp_source"] == "override"
    log = [json.loads(line) for line in (out / "extract_log.jsonl").read_text().splitlines()]
    assert [x["status"] for x in log].count("failed") == 1 and len(log) == 6
    # a resumed run with other settings never mixes them into the same folder
    other = extract_cohort(src, stage0, out, options=ExtractOptions(**{**opts.__dict__, "patch_size": 128}))
    assert other["failed"] == 3 and {r["error"] for r in other["records"]} == {"settings_mismatch"}
    assert "patch_size" in other["records"][0]["reason"]


def test_find_slides_and_bad_input(tmp_path, synth_cohort, stage0):
    jobs = find_slides(synth_cohort)
    assert len(jobs) == 8 and all(j.path.is_file() for j in jobs)
    with pytest.raises(Exception, match="neither a known config"):
        load_encoder(tmp_path / "missing.pt")
    bad = tmp_path / "bad.csv"
    bad.write_text("case_id,slide\nA,B\n")
    with pytest.raises(Exception, match="lacks columns"):
        find_slides(bad)
    # an unreadable file is recorded as a failure, the cohort goes on
    (tmp_path / "junk.svs").write_bytes(b"not a slide")
    res = extract_cohort(tmp_path, stage0, tmp_path / "o", options=OPTS)
    assert res["failed"] == 1 and res["records"][0]["error"]


def _cli(cohort: Path, encoder: Path, out: Path) -> list[str]:
    return [
        str(MSTAR),
        "extract",
        str(cohort),
        "--encoder",
        str(encoder),
        "--out",
        str(out),
        "--mpp",
        "0.5",
        "--patch-size",
        "112",
        "--batch-size",
        "16",
        "--workers",
        "1",
    ]


def test_killed_run_resumes_to_identical_files(tmp_path, synth_cohort, stage0):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = tmp_path / "full"
    subprocess.run(_cli(synth_cohort, stage0, full), check=True, env=env, capture_output=True)
    done_full = sorted(p.name for p in full.glob("*.h5"))
    assert len(done_full) >= 5

    part = tmp_path / "part"
    proc = subprocess.Popen(
        _cli(synth_cohort, stage0, part), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list(part.glob("*.h5")) and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # a real interruption, mid-way through the cohort
    proc.wait()
    done_part = sorted(p.name for p in part.glob("*.h5"))
    assert 1 <= len(done_part) < len(done_full), "the run was not interrupted half way"
    shutil.copy(part / "extract_log.jsonl", tmp_path / "killed_log.jsonl")

    subprocess.run(_cli(synth_cohort, stage0, part), check=True, env=env, capture_output=True)
    assert sorted(p.name for p in part.glob("*.h5")) == done_full
    assert not [p for p in part.iterdir() if p.name.endswith(".tmp") and not p.name.startswith(".")]
    log = [json.loads(line) for line in (part / "extract_log.jsonl").read_text().splitlines()]
    skipped = {x["slide_id"] for x in log if x["status"] == "skipped"}
    assert {n.removesuffix(".h5") for n in done_part} <= skipped
    for name in done_full:
        a, b = _h5(full / name), _h5(part / name)
        assert a.keys() == b.keys()
        np.testing.assert_array_equal(a["coords"], b["coords"])
        assert np.abs(a["features"] - b["features"]).max() <= 1e-6
        assert a["attrs"].keys() == b["attrs"].keys()
        for k in a["attrs"]:
            np.testing.assert_array_equal(a["attrs"][k], b["attrs"][k])


def test_extract_slide_api_with_open_reader(tmp_path, cmu_svs, stage0):
    enc = load_encoder(stage0)
    with open_slide(cmu_svs) as r:
        res = extract_slide(r, enc, tmp_path / "x.h5", target_mpp=2.0, patch_size=112, workers=1)
        assert r.read_region((0, 0), 0, (4, 4)).shape == (4, 4, 3)  # the caller's reader stays open
    assert res["patches"] == _h5(tmp_path / "x.h5")["features"].shape[0] > 0


@pytest.mark.parametrize(
    "option",
    [("--patch-size", "0"), ("--mpp", "0"), ("--mpp", "nan"), ("--batch-size", "0"), ("--tissue-threshold", "5")],
)
def test_out_of_range_run_options_are_refused_before_any_slide(tmp_path: Path, option) -> None:
    """An out-of-range run-wide option failed every slide one by one ("8 slide(s) failed") and exited 0."""
    from click.testing import CliRunner

    from training.extract import extract

    (tmp_path / "slides").mkdir()
    res = CliRunner().invoke(
        extract, [str(tmp_path / "slides"), "--encoder", "vit_micro_112", "--out", str(tmp_path / "out"), *option]
    )
    assert res.exit_code != 0 and f"{option[0]} out of range" in res.output, res.output
    assert not (tmp_path / "out").exists()
