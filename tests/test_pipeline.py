"""`service.pipeline.run_analysis` and `mstar analyze`: one slide end to end, on every real slide that can be
analysed, with clean refusals, cancellation, and the same answer through a real Triton server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from inference_fixtures import build_tiny_bundle
from PIL import Image

from service.errors import CorruptSlideError, InvalidParameterError, MissingMppError, UnsupportedFormatError
from service.inference.bundle import load_bundle
from service.inference.ort_backend import OrtBackend
from service.pipeline import AnalysisOptions, JobCanceled, run_analysis
from service.slides.grid import build_grid
from service.slides.h5io import read_h5
from service.slides.open import open_slide
from service.slides.stream import iter_batches

ROOT = Path(__file__).resolve().parents[1]
MSTAR = Path(sys.executable).parent / "mstar"


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    return build_tiny_bundle(tmp_path_factory.getbasetemp())


def _check_outputs(out: Path, result: dict, n_labels: int = 3) -> None:
    on_disk = json.loads((out / "result.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    coords, feats, attrs = read_h5(out / "features.h5")
    n = result["tiling"]["patches"]
    assert coords.shape == (n, 2) and coords.dtype == np.int64
    assert feats is not None and feats.shape == (n, 96) and np.isfinite(feats).all()
    assert attrs["patch_size"] == 112 and attrs["target_mpp"] == pytest.approx(0.5)
    w, h = attrs["level0_width"], attrs["level0_height"]
    assert (coords >= 0).all() and (coords[:, 0] + attrs["patch_size_level0"] <= w).all()
    assert (coords[:, 1] + attrs["patch_size_level0"] <= h).all()
    emb = result["embedding"]
    assert emb["dim"] == 64 and len(emb["values"]) == 64 and np.isfinite(emb["values"]).all()
    probs = result["classification"]["subtype"]["probabilities"]
    assert len(probs) == n_labels and sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
    assert result["classification"]["subtype"]["label"] == max(probs, key=probs.get)
    surv = result["survival"]["survival"]
    curve = np.asarray(surv["survival"])
    assert curve.shape == (4,) and (np.diff(curve) <= 1e-9).all() and (curve >= 0).all() and (curve <= 1).all()
    assert surv["risk"] == pytest.approx(-curve.sum())
    with Image.open(out / "heatmap.png") as im:
        assert im.format == "PNG" and min(im.size) > 100
    assert result["bundle"]["demo"] is True and "not a diagnosis" in result["notice"]


def test_tiling_only_without_a_bundle(cmu_svs: Path, tmp_path: Path) -> None:
    result = run_analysis(cmu_svs, tmp_path)
    assert result["status"] == "tiled" and "stopped after tiling" in result["note"]
    coords, feats, attrs = read_h5(tmp_path / "features.h5")
    assert feats is None and len(coords) == result["tiling"]["patches"] > 0
    assert attrs["mpp_source"] == "aperio"
    assert "cmu" not in json.dumps(result).lower()  # the file name (possible PHI) is not echoed


def test_full_analysis_matches_its_parts(cmu_svs: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    stages: list[str] = []
    result = run_analysis(
        cmu_svs, tmp_path, AnalysisOptions(), bundle_dir=tiny_bundle, progress=lambda s, f: stages.append(s)
    )
    _check_outputs(tmp_path, result)
    assert {"open", "grid", "embed", "aggregate", "heads", "write"} <= set(stages)
    report = result["report"]
    assert report["available"] and report["ai_generated"] and report["text"].strip()
    assert "pathologist must review" in report["notice"]
    # the features are the encoder applied to the grid's patches, in grid order
    coords, feats, _ = read_h5(tmp_path / "features.h5")
    bundle = load_bundle(tiny_bundle)
    with open_slide(cmu_svs) as reader, OrtBackend(bundle, device="cpu") as be:
        grid = build_grid(reader, target_mpp=0.5, patch_size=112)
        np.testing.assert_array_equal(coords, grid.coords)
        patches, _ = next(iter_batches(reader, grid, batch_size=16))
        np.testing.assert_allclose(feats[:16], be.embed_patches(patches), atol=1e-5)
        agg = be.aggregate(feats)
    np.testing.assert_allclose(result["embedding"]["values"], agg["embedding"], atol=1e-5)
    top = result["attention"]["top_patches"][0]
    i = int(np.argmax(agg["attention"]))
    assert (top["x"], top["y"]) == tuple(int(v) for v in coords[i])


@pytest.mark.parametrize(
    ("fixture", "mpp"),
    [("cmu_svs", None), ("ndpi", None), ("dicom_dir", None), ("tcga_j2k_svs", 0.25)],
)
def test_every_real_slide_that_can_be_analysed(request, fixture, mpp, tiny_bundle, tmp_path) -> None:
    slide = request.getfixturevalue(fixture)
    result = run_analysis(slide, tmp_path, AnalysisOptions(mpp_override=mpp), bundle_dir=tiny_bundle)
    _check_outputs(tmp_path, result)
    assert abs(result["tiling"]["effective_mpp"] - 0.5) / 0.5 <= 0.05


def test_refusals_are_typed_and_leave_no_result(tcga_j2k_svs, bad_dicom, cmu_svs, tiny_bundle, tmp_path) -> None:
    with pytest.raises(MissingMppError, match="override"):
        run_analysis(tcga_j2k_svs, tmp_path / "a", bundle_dir=tiny_bundle)
    with pytest.raises((CorruptSlideError, UnsupportedFormatError)):
        run_analysis(bad_dicom, tmp_path / "b", bundle_dir=tiny_bundle)
    with pytest.raises(InvalidParameterError, match="112"):
        run_analysis(cmu_svs, tmp_path / "c", AnalysisOptions(patch_size=224), bundle_dir=tiny_bundle)
    with pytest.raises(InvalidParameterError, match="wrong scale"):
        run_analysis(cmu_svs, tmp_path / "d", AnalysisOptions(target_mpp=1.0), bundle_dir=tiny_bundle)
    with pytest.raises(InvalidParameterError, match="unknown task"):
        AnalysisOptions(tasks=("embedding", "astrology"))
    with pytest.raises(InvalidParameterError, match="prompt"):
        AnalysisOptions(tasks=("zeroshot",))
    with pytest.raises(InvalidParameterError, match="at least two prompts"):  # one always scored 1.0
        AnalysisOptions(tasks=("zeroshot",), prompts=("tumour",))
    assert not any((tmp_path / d / "result.json").exists() for d in "abcd")


def test_cancel_stops_between_batches(cmu_svs, tiny_bundle, tmp_path) -> None:
    seen: list[tuple[str, float]] = []
    with pytest.raises(JobCanceled):
        run_analysis(
            cmu_svs,
            tmp_path,
            AnalysisOptions(batch_size=8),
            bundle_dir=tiny_bundle,
            progress=lambda s, f: seen.append((s, f)),
            should_cancel=lambda: any(s == "embed" and f > 0 for s, f in seen),
        )
    assert not (tmp_path / "result.json").exists()
    assert max(f for s, f in seen if s == "embed") < 1.0


def test_cli_analyze_and_refusal(cmu_svs, tcga_j2k_svs, tiny_bundle, tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ok = subprocess.run(
        [str(MSTAR), "analyze", str(cmu_svs), "--bundle", str(tiny_bundle), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert ok.returncode == 0, ok.stderr
    summary = json.loads(ok.stdout)
    assert summary["status"] == "analyzed" and "subtype" in summary["classification"]
    assert "demo" in ok.stderr.lower()
    assert {Path(p).name for p in summary["files"]} == {"features.h5", "heatmap.png", "patch_scores.h5", "result.json"}
    bad = subprocess.run(
        [str(MSTAR), "analyze", str(tcga_j2k_svs), "--bundle", str(tiny_bundle), "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error [missing_mpp]")
    assert "Traceback" not in bad.stderr
    # a setting the settings class refuses is one line naming the variable, before any work, not a traceback
    unset = subprocess.run(
        [str(MSTAR), "analyze", str(cmu_svs), "--bundle", str(tiny_bundle), "--out", str(tmp_path / "s")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "MSTAR_TILE_DECODER": "nvjpeg"},
    )
    last = unset.stderr.strip().splitlines()[-1]
    assert unset.returncode == 2 and "Traceback" not in unset.stderr and not (tmp_path / "s").exists()
    assert last.startswith("error [invalid_settings]: MSTAR_TILE_DECODER") and "'nvimgcodec'" in last


@pytest.mark.services
def test_triton_backend_gives_the_same_analysis(cmu_svs, tiny_bundle, tmp_path, monkeypatch) -> None:
    pytest.importorskip("pytriton")
    from triton_launcher import TritonServer

    from service.inference.triton_backend import TritonBackend

    bundle = load_bundle(tiny_bundle)
    local = run_analysis(cmu_svs, tmp_path / "ort", bundle_dir=tiny_bundle)
    with TritonServer(bundle.root, startup_timeout_s=120) as srv:
        with TritonBackend(bundle, srv.grpc_url) as be:
            remote = run_analysis(cmu_svs, tmp_path / "triton", backend=be)
        # the same through the settings a deployment uses (MSTAR_BACKEND / MSTAR_TRITON_URL), over HTTP
        monkeypatch.setenv("MSTAR_BACKEND", "triton")
        monkeypatch.setenv("MSTAR_TRITON_URL", srv.http_url)
        monkeypatch.setenv("MSTAR_TRITON_PROTOCOL", "http")
        via_settings = run_analysis(cmu_svs, tmp_path / "settings", bundle_dir=tiny_bundle)
    assert via_settings["embedding"]["values"] == pytest.approx(remote["embedding"]["values"], abs=1e-6)
    a, b = np.asarray(local["embedding"]["values"]), np.asarray(remote["embedding"]["values"])
    assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) >= 0.9999
    pa = local["classification"]["subtype"]["probabilities"]
    pb = remote["classification"]["subtype"]["probabilities"]
    assert pa == pytest.approx(pb, abs=1e-5)
    assert local["survival"]["survival"]["risk"] == pytest.approx(remote["survival"]["survival"]["risk"], abs=1e-5)


def test_a_result_holding_nan_or_infinity_is_refused_naming_the_field(tmp_path) -> None:
    """A NaN from a model (an RNA value beyond float32, a region of 1e300 px) was written into result.json as a
    bare `NaN`/`Infinity` token, which strict JSON parsers and the viewer refuse, and the job succeeded. The job
    now fails with `non_finite_result` naming the field, and no result file is written."""
    from service.errors import NonFiniteResultError
    from service.pipeline import _write_json_atomic

    path = tmp_path / "result.json"
    with pytest.raises(NonFiniteResultError, match=r"at survival\.risk$") as err:
        _write_json_atomic(path, {"slide": {"sha256": "x"}, "survival": {"risk": float("nan")}})
    assert err.value.code == "non_finite_result" and not path.exists() and not list(tmp_path.iterdir())
    with pytest.raises(NonFiniteResultError, match=r"at roi\.area\[1\]$"):
        _write_json_atomic(path, {"roi": {"area": [1.0, float("inf")]}})
    _write_json_atomic(path, {"ok": [1.0, 2], "nested": {"x": 0.5}})
    assert json.loads(path.read_text()) == {"ok": [1.0, 2], "nested": {"x": 0.5}}


def test_zero_shot_prompts_are_checked_before_any_tile_is_read() -> None:
    """Too many prompts, a blank one or one over the length limit were refused only after tiling, embedding,
    aggregation, heads and report had all run (minutes on a large slide), leaving partial outputs behind."""
    with pytest.raises(InvalidParameterError, match="between 1 and 64 prompts"):
        AnalysisOptions(tasks=("zeroshot",), prompts=tuple(f"class {i}" for i in range(65)))
    with pytest.raises(InvalidParameterError, match="non-empty and at most 1000"):
        AnalysisOptions(tasks=("embedding", "zeroshot"), prompts=("tumour", "   "))
    with pytest.raises(InvalidParameterError, match="non-empty and at most 1000"):
        AnalysisOptions(tasks=("zeroshot",), prompts=("tumour", "x" * 1001))
    assert AnalysisOptions(tasks=("zeroshot",), prompts=("tumour", "normal")).prompts == ("tumour", "normal")


def test_a_failed_analysis_leaves_the_previous_one_whole(cmu_svs, tiny_bundle, tmp_path) -> None:
    """An analysis that failed after writing its features left them beside the previous analysis's result.json
    (another slide's), a folder that looked complete. The files now go into a staging folder and move in only
    when the analysis succeeds; a later success replaces every output of the previous one."""
    out = tmp_path / "out"
    first = run_analysis(cmu_svs, out, AnalysisOptions(batch_size=32), bundle_dir=tiny_bundle)
    (out / "annotations.geojson").write_text("{}")  # as `mstar analyze --geojson` leaves it
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    seen: list[str] = []
    with pytest.raises(JobCanceled):  # fails after features.h5 and heatmap.png were written
        run_analysis(
            cmu_svs,
            out,
            AnalysisOptions(batch_size=32, tissue_threshold=0.5),
            bundle_dir=tiny_bundle,
            progress=lambda s, f: seen.append(s),
            should_cancel=lambda: "heads" in seen,
        )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing changed, no staging left
    second = run_analysis(cmu_svs, out, AnalysisOptions(batch_size=32, tissue_threshold=0.5), bundle_dir=tiny_bundle)
    assert second["tiling"]["patches"] < first["tiling"]["patches"]
    assert sorted(p.name for p in out.iterdir()) == ["features.h5", "heatmap.png", "patch_scores.h5", "result.json"]
    _check_outputs(out, second)
