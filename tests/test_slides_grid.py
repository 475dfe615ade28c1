"""Grid at a target µm/px on every real slide, level choice, tissue fractions, and container parity."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from slide_fixtures import write_generic_tiff, write_ome_tiff

from service.errors import InvalidParameterError, MissingMppError
from service.slides.grid import build_grid, choose_level, tissue_fractions
from service.slides.open import open_slide


@pytest.fixture(scope="module")
def derived(cmu_svs: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("derived")
    return {
        "generic": write_generic_tiff(cmu_svs, d / "cmu.generic.tif"),
        "ome": write_ome_tiff(cmu_svs, d / "cmu.pyramid.ome.tif"),
    }


def _tissue_stats(patch: np.ndarray, background: str) -> float:
    """Fraction of pixels that look like tissue: stained (saturated, not white) or glowing on black."""
    if background == "dark":
        return float((patch.max(axis=2) > 30).mean())
    hsv = cv2.cvtColor(patch, cv2.COLOR_RGB2HSV)
    return float(((hsv[:, :, 1] > 25) & (hsv[:, :, 2] < 235)).mean())


def _check_bounds(grid) -> None:
    c = grid.coords
    assert c.dtype == np.int64 and c.ndim == 2 and c.shape[1] == 2 and len(c) > 0
    assert (c >= 0).all()
    assert (c[:, 0] + grid.patch_size_level0 <= grid.level0_width).all()
    assert (c[:, 1] + grid.patch_size_level0 <= grid.level0_height).all()
    # Row-major order, no duplicates.
    order = np.lexsort((c[:, 0], c[:, 1]))
    assert (order == np.arange(len(c))).all()
    assert len(np.unique(c, axis=0)) == len(c)


def _check_every_patch_has_tissue(reader, grid, min_fraction: float) -> None:
    bg = grid.mask.background
    fracs = []
    for x, y in grid.coords:
        patch = reader.read_region((int(x), int(y)), grid.read_level, (grid.read_size, grid.read_size))
        fracs.append(_tissue_stats(patch, bg))
    fracs = np.array(fracs)
    assert fracs.min() >= min_fraction, f"patch with too little tissue: {fracs.min():.3f}"


# --- level choice -------------------------------------------------------------------------------------


def test_native_level_within_tolerance_is_read_as_is() -> None:
    c = choose_level((1.0, 4.0, 16.0), 0.499, 0.5, 224)
    assert (c.read_level, c.read_size, c.upsampled) == (0, 224, False)
    assert c.effective_mpp == pytest.approx(0.499)
    c = choose_level((1.0, 2.0, 4.0), 0.25, 1.0, 224)  # 4x level is exactly 1.0
    assert (c.read_level, c.read_size) == (2, 224)


def test_finer_level_is_read_larger_and_resized() -> None:
    c = choose_level((1.0, 2.0, 4.0, 8.0), 0.2282, 0.5, 224)  # NDPI-like 40x
    assert c.read_level == 1  # 0.456 µm/px: finer than 0.5, coarser than level 0
    assert c.read_size == round(224 * 0.5 / 0.4564)
    assert c.effective_mpp == pytest.approx(0.5, rel=0.005)


def test_upsampling_is_refused_unless_allowed() -> None:
    with pytest.raises(InvalidParameterError, match="coarser than the requested"):
        choose_level((1.0, 4.0), 1.0, 0.5, 224)
    c = choose_level((1.0, 4.0), 1.0, 0.5, 224, allow_upsample=True)
    assert c.upsampled and c.read_level == 0 and c.read_size == 112
    c = choose_level((1.0,), 0.52, 0.5, 224)  # 4 % off: within the default 5 % tolerance
    assert not c.upsampled and c.read_size == 224


@pytest.mark.parametrize(
    "bad",
    [
        {"target_mpp": 0.0},
        {"target_mpp": float("nan")},
        {"patch_size": 4},
        {"patch_size": 10_000},
        {"tolerance": 1.5},
        {"target_mpp": 20.0},  # 224 x 40 px per patch from the only level: refused, memory would explode
    ],
)
def test_bad_level_parameters(bad: dict) -> None:
    kw = {"target_mpp": 0.5, "patch_size": 224} | bad
    tol = kw.pop("tolerance", 0.05)
    with pytest.raises(InvalidParameterError):
        choose_level((1.0,), 0.5, kw["target_mpp"], kw["patch_size"], tolerance=tol)


# --- real slides --------------------------------------------------------------------------------------


def test_cmu_svs_grid(cmu_svs: Path) -> None:
    with open_slide(cmu_svs) as r:
        g = build_grid(r)
        _check_bounds(g)
        assert (g.read_level, g.read_size, g.patch_size, g.patch_size_level0) == (0, 224, 224, 224)
        assert g.effective_mpp == pytest.approx(0.499, abs=1e-3) and g.mpp_source == "aperio"
        assert (g.level0_width, g.level0_height) == (2220, 2967)
        assert (g.tissue_fraction >= 0.25).all()
        assert 30 <= len(g) <= 90  # peers: 38-82 on this crop depending on segmentation
        _check_every_patch_has_tissue(r, g, 0.05)


def test_ndpi_fluorescence_tiles_through_coarser_level(ndpi: Path) -> None:
    with open_slide(ndpi) as r:
        assert r.mpp.mean == pytest.approx(0.2282, abs=1e-3)
        g = build_grid(r)
        _check_bounds(g)
        assert g.read_level > 0 and g.level_downsample == pytest.approx(2.0)  # not read at 0.228
        assert g.read_size != g.patch_size  # 0.456 -> 0.5 by an area resize
        assert g.effective_mpp == pytest.approx(0.5, rel=0.01)
        assert g.patch_size_level0 == pytest.approx(224 * 0.5 / r.mpp.mean, rel=0.01)
        assert g.mask.background == "dark"
        _check_every_patch_has_tissue(r, g, 0.02)


def test_j2k_svs_without_mpp_refused_then_tiled_with_override(tcga_j2k_svs: Path) -> None:
    with open_slide(tcga_j2k_svs) as r, pytest.raises(MissingMppError):
        build_grid(r)
    with open_slide(tcga_j2k_svs, mpp_override=0.25) as r:
        g = build_grid(r)
        _check_bounds(g)
        assert g.mpp_source == "override" and g.read_level == 1  # 0.25 x 2.0005 = 0.50 µm/px
        assert g.patch_size_level0 == pytest.approx(448, abs=1)
        _check_every_patch_has_tissue(r, g, 0.2)


def test_dicom_series_grid(dicom_dir: Path) -> None:
    with open_slide(dicom_dir) as r:
        g = build_grid(r)
        _check_bounds(g)
        assert g.patch_size_level0 == 224 and g.mpp_source.startswith("dicom")
        _check_every_patch_has_tissue(r, g, 0.05)


def test_same_pixels_in_four_containers_give_the_same_grid(
    cmu_svs: Path, dicom_dir: Path, derived: dict[str, Path]
) -> None:
    grids = {}
    for name, path in {"svs": cmu_svs, "dicom": dicom_dir, **derived}.items():
        with open_slide(path) as r:
            grids[name] = build_grid(r)
    ref = grids["svs"]
    for name, g in grids.items():
        assert (g.level0_width, g.level0_height) == (2220, 2967), name
        assert g.mpp == pytest.approx(0.499, abs=2e-3), name
        assert g.patch_size_level0 == 224, name
        assert abs(len(g) - len(ref)) <= 0.1 * len(ref), (name, len(g), len(ref))
        # Most coordinates are shared, not just the count.
        shared = len({tuple(c) for c in g.coords} & {tuple(c) for c in ref.coords})
        assert shared >= 0.85 * len(ref), (name, shared, len(ref))


def test_overlap_and_threshold(cmu_svs: Path) -> None:
    with open_slide(cmu_svs) as r:
        g0 = build_grid(r)
        g_ov = build_grid(r, overlap=112, tissue=g0.mask)
        g_strict = build_grid(r, tissue_threshold=0.9, tissue=g0.mask)
        g_any = build_grid(r, tissue_threshold=0.0, tissue=g0.mask)
        with pytest.raises(InvalidParameterError):
            build_grid(r, overlap=224, tissue=g0.mask)
        with pytest.raises(InvalidParameterError):
            build_grid(r, tissue_threshold=1.5, tissue=g0.mask)
    assert g_ov.step_level0 == 112 and len(g_ov) > 3 * len(g0)
    assert len(g_strict) < len(g0) < len(g_any) < g0.n_candidates
    assert set(map(tuple, g_strict.coords)) <= set(map(tuple, g0.coords))


def test_no_patch_over_threshold_is_a_typed_refusal(tmp_path: Path) -> None:
    from PIL import Image

    from service.errors import NoTissueError

    img = np.full((2000, 2000, 3), 245, np.uint8)
    # 160 µm of "tissue" at 0.25 µm/px: above the minimum tissue area, but no 112 µm patch on the 448 px
    # grid lies more than ~66 % inside it in each direction.
    img[1000:1640, 1000:1640] = (170, 70, 160)
    Image.fromarray(img).save(tmp_path / "small.png")
    with open_slide(tmp_path / "small.png", mpp_override=0.25) as r:
        g = build_grid(r, patch_size=64)  # 128 level-0 px: several patches fully inside the square
        assert len(g) >= 1
        with pytest.raises(NoTissueError, match="no 224 px patch"):
            build_grid(r, tissue_threshold=0.9)


def test_tissue_fraction_matches_brute_force(cmu_svs: Path) -> None:
    """The integral-image fractions equal the mask area measured on an upsampled mask."""
    with open_slide(cmu_svs) as r:
        g = build_grid(r, tissue_threshold=0.0)
    m = g.mask
    # Upsample the mask to level 0 (nearest) and count directly.
    up = cv2.resize(m.mask.astype(np.uint8), (g.level0_width, g.level0_height), interpolation=cv2.INTER_NEAREST)
    pick = np.linspace(0, len(g) - 1, 25).astype(int)
    xs, ys = g.coords[pick, 0].astype(float), g.coords[pick, 1].astype(float)
    fast = tissue_fractions(m, xs, ys, g.patch_size_level0)
    s = g.patch_size_level0
    brute = np.array([up[int(y) : int(y) + s, int(x) : int(x) + s].mean() for x, y in zip(xs, ys, strict=True)])
    np.testing.assert_allclose(fast, brute, atol=0.03)
