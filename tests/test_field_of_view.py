"""The field of view a bundle was trained on travels with it: official mSTAR/UNI features are 256 px at
0.5 µm/px (128 µm) resized to 224, so a served patch must cover 128 µm of tissue, not 224 x 0.5 = 112 µm."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from inference_fixtures import build_tiny_bundle

from service.errors import InvalidParameterError
from service.inference.bundle import Preprocessing, load_bundle
from service.pipeline import AnalysisOptions, run_analysis, tiling_for
from service.slides.grid import build_grid
from service.slides.h5io import read_h5
from service.slides.open import open_slide
from training.models.patch_encoder import OFFICIAL_FIELD_UM, PATCH_ENCODERS

OFFICIAL = Preprocessing(patch_size=224, target_mpp=0.5, field_um=128.0)


def test_manifest_field_of_view_and_old_manifests() -> None:
    old = Preprocessing(patch_size=224, target_mpp=0.5)  # a manifest written before field_um existed
    assert old.patch_um == pytest.approx(112.0) and old.read_px == 224 and old.grid_mpp == pytest.approx(0.5)
    assert OFFICIAL.read_px == 256 and OFFICIAL.grid_mpp == pytest.approx(128 / 224)
    for arch in ("mstar_vit_l16", "uni_vit_l16"):  # what import-encoder / extract default to
        spec = PATCH_ENCODERS[arch]
        assert spec.field_um == OFFICIAL_FIELD_UM == 128.0 and spec.preprocessing.size == 224
    assert PATCH_ENCODERS["vit_micro_112"].field_um is None


def _steps(coords: np.ndarray) -> tuple[int, int]:
    xs, ys = np.unique(coords[:, 0]), np.unique(coords[:, 1])
    return int(np.diff(xs).min()), int(np.diff(ys).min())


def test_official_bundle_tiles_128_um_patches(cmu_svs: Path) -> None:
    grid_mpp, size = tiling_for(OFFICIAL, AnalysisOptions())
    with open_slide(cmu_svs) as reader:  # Aperio, 0.499 µm/px
        grid = build_grid(reader, target_mpp=grid_mpp, patch_size=size)
        mpp = reader.mpp.x
    assert grid.patch_size == 224 and len(grid) > 4
    assert grid.read_level == 0 and grid.read_size in (256, 257)  # 128 µm / 0.499 µm/px = 256.5 px read, resized
    assert grid.patch_size_level0 * grid.mpp == pytest.approx(128.0, rel=0.01)
    assert grid.step_level0 * grid.mpp == pytest.approx(128.0, rel=0.01)
    sx, sy = _steps(grid.coords)
    assert sx == sy == grid.step_level0
    assert mpp == pytest.approx(0.499, rel=0.01)


def test_a_job_cannot_change_the_bundles_scale() -> None:
    with pytest.raises(InvalidParameterError, match="wrong scale"):
        tiling_for(OFFICIAL, AnalysisOptions(target_mpp=1.0))
    with pytest.raises(InvalidParameterError, match="224 px"):
        tiling_for(OFFICIAL, AnalysisOptions(patch_size=256))


def test_served_patch_covers_the_bundles_field(cmu_svs: Path, tmp_path_factory, tmp_path: Path) -> None:
    """A real bundle whose manifest says 128 µm per patch: the analysis reads 128 µm squares (level-0 coords
    step and read size), resized to the encoder's input size."""
    src = build_tiny_bundle(tmp_path_factory.getbasetemp())
    bundle = tmp_path / "bundle"
    shutil.copytree(src, bundle)
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert manifest["preprocessing"].get("field_um") is None
    manifest["preprocessing"]["field_um"] = 128.0
    (bundle / "bundle.json").write_text(json.dumps(manifest))
    b = load_bundle(bundle)
    size = b.manifest.preprocessing.patch_size  # 112: the tiny encoder's input

    res = run_analysis(cmu_svs, tmp_path / "out", AnalysisOptions(tasks=("embedding",)), bundle_dir=bundle)
    t = res["tiling"]
    assert t["patch_size"] == size and t["field_um"] == pytest.approx(128.0)
    assert t["read_size"] in (256, 257) and t["patch_size_level0"] * 0.499 == pytest.approx(128.0, rel=0.01)
    coords, feats, _ = read_h5(tmp_path / "out" / "features.h5")
    sx, sy = _steps(coords)
    assert sx * 0.499 == pytest.approx(128.0, rel=0.01) and sy == sx
    assert feats is not None and feats.shape == (t["patches"], b.manifest.embed_dim)
