"""Tissue mask on the real slides (bright-field and fluorescence) and refusals on blank images."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from service.errors import InvalidParameterError, NoTissueError
from service.slides.open import open_slide
from service.slides.tissue import TissueParams, detect_background, segment_tissue, tissue_mask


def _saturation(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[:, :, 1]


def test_he_slide_mask_is_bright_background_and_separates_stain(cmu_svs: Path) -> None:
    with open_slide(cmu_svs) as r:
        m = tissue_mask(r, mpp=r.mpp.mean)
    assert m.background == "bright"
    # CMU-1-Small-Region: a strip of skin covering roughly a third of the crop.
    assert 0.15 < m.tissue_fraction < 0.6
    # ~8 µm/px: 2220 px * 0.499 µm / 8 ≈ 138 px wide.
    assert abs(m.mask.shape[1] - 138) <= 2 and abs(m.mask_mpp - 8.0) < 0.2
    sat = _saturation(m.thumbnail)
    assert sat[m.mask].mean() > 3 * sat[~m.mask].mean()


def test_fluorescence_slide_uses_brightness_on_black(ndpi: Path) -> None:
    with open_slide(ndpi) as r:
        m = tissue_mask(r, mpp=r.mpp.mean)
    assert m.background == "dark"
    bright = m.thumbnail.max(axis=2).astype(float)
    assert bright[m.mask].mean() > 3 * bright[~m.mask].mean()
    # DAPI nuclei cover most of this section: a saturation/Otsu mask meant for H&E would find almost nothing
    # here (background is black and "saturated" noise), the brightness mask finds the section.
    assert m.tissue_fraction > 0.4


def test_he_thumbnail_forced_to_dark_polarity_differs(cmu_svs: Path) -> None:
    with open_slide(cmu_svs) as r:
        thumb = r.thumbnail(400)
    mask_bright, bg, _ = segment_tissue(thumb, pixel_um=0.499 * 2967 / 400)
    assert bg == "bright" and detect_background(thumb) == "bright"
    mask_dark, _, _ = segment_tissue(thumb, pixel_um=0.499 * 2967 / 400, background="dark")
    assert (mask_bright != mask_dark).mean() > 0.2


def test_black_scan_border_does_not_flip_he_to_fluorescence(cmu_svs: Path) -> None:
    with open_slide(cmu_svs) as r:
        thumb = r.thumbnail(300).copy()
    b = 12
    thumb[:b], thumb[-b:], thumb[:, :b], thumb[:, -b:] = 0, 0, 0, 0  # black frame, as some scanners pad
    assert detect_background(thumb) == "bright"
    mask, _, _ = segment_tissue(thumb, pixel_um=0.499 * 2967 / 300)
    assert not mask[:b].any() and 0.1 < mask.mean() < 0.6


def test_area_filters_drop_specks_and_fill_small_holes() -> None:
    img = np.full((400, 400, 3), 245, np.uint8)
    img[100:300, 100:300] = (180, 60, 160)  # a 200 x 200 px purple "section"
    img[190:196, 190:196] = 245  # a 6 px hole (~0.002 mm² at 8 µm/px)
    img[20:23, 20:23] = (180, 60, 160)  # a 3 px speck
    mask, bg, _ = segment_tissue(img, pixel_um=8.0, params=TissueParams(median_um=8.0, close_um=8.0))
    assert bg == "bright"
    assert mask[193, 193]  # hole filled
    assert not mask[21, 21]  # speck dropped
    assert mask[150, 150] and not mask[50, 350]


@pytest.mark.parametrize("value", [255, 0])
def test_blank_image_has_no_tissue(tmp_path: Path, value: int) -> None:
    path = tmp_path / f"blank{value}.png"
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 4, size=(600, 600, 3), dtype=np.uint8)
    arr = (255 - noise) if value == 255 else noise
    Image.fromarray(arr.astype(np.uint8)).save(path)
    with open_slide(path, mpp_override=0.5) as r, pytest.raises(NoTissueError, match="no tissue"):
        tissue_mask(r, mpp=0.5)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(InvalidParameterError):
        segment_tissue(np.zeros((10, 10), np.uint8), pixel_um=8.0)
    with pytest.raises(InvalidParameterError):
        segment_tissue(np.zeros((10, 10, 3), np.uint8), pixel_um=0.0)
    with pytest.raises(InvalidParameterError):
        segment_tissue(np.zeros((10, 10, 3), np.uint8), pixel_um=8.0, background="grey")


def test_small_crop_gets_a_finer_mask_and_keeps_its_tissue(cmu_svs: Path, tmp_path: Path) -> None:
    """A 0.3 mm crop (a biopsy region, a TMA core) is 38 px at 8 µm/px, and its whole tissue is smaller than the
    default minimum tissue area: the mask goes finer and the area filters scale down instead of erasing it."""
    with open_slide(cmu_svs) as r:
        crop = r.read_region((600, 1300), 0, (600, 600))
    path = tmp_path / "crop.png"
    Image.fromarray(crop).save(path)
    with open_slide(path, mpp_override=0.5) as r:
        m = tissue_mask(r, mpp=0.5)
    assert max(m.mask.shape) >= TissueParams().min_thumbnail_side
    assert m.mask_mpp < 8.0
    assert m.tissue_fraction > 0.2
    sat = _saturation(m.thumbnail)
    if (~m.mask).any():
        assert sat[m.mask].mean() > sat[~m.mask].mean()


def test_the_mask_of_a_jpeg_slide_without_a_pyramid_decodes_its_tiles_scaled(
    cmu_svs: Path, tmp_path: Path, monkeypatch
) -> None:
    """A slide without a pyramid has no level near the mask's scale: its mask read every pixel of level 0 in full
    (268 MP: 22 s; a 60k x 60k file 125 s). JPEG tiles are now decoded by libjpeg's DCT scaling (at most 1/8,
    the IDCT of each 8x8 block at the smaller size), then area-shrunk: 24x less time on that file, the mask
    within a fraction of a percent of the full decode's."""
    import tifffile

    import service.slides.fasttiles as ft
    from service.slides.fasttiles import reduced_j2k_image

    with open_slide(cmu_svs) as r:
        src = r.read_region((0, 0), 0, (2048, 2048))
    quad = np.concatenate([np.concatenate([src, src[:, ::-1]], 1), np.concatenate([src[::-1], src[::-1, ::-1]], 1)])
    path = tmp_path / "flat.tif"  # 4096 x 4096, one level: past the mask's direct read (16 MP)
    tifffile.imwrite(path, quad, tile=(256, 256), compression="jpeg", photometric="rgb")
    scaled = reduced_j2k_image(path, 4096, 4096, 1 / 8)
    assert scaled is not None and scaled.shape == (512, 512, 3)
    assert np.abs(scaled.astype(int) - cv2.resize(quad, (512, 512), interpolation=cv2.INTER_AREA)).mean() < 2

    masks = {}
    for most in (0, ft.MAX_JPEG_REDUCE):  # 0: the full decode it replaces
        monkeypatch.setattr(ft, "MAX_JPEG_REDUCE", most)
        with open_slide(path, mpp_override=0.5) as r:
            masks[most] = tissue_mask(r, mpp=0.5)
    full, fast = masks[0], masks[ft.MAX_JPEG_REDUCE]
    assert full.thumbnail.shape == fast.thumbnail.shape
    assert np.abs(full.thumbnail.astype(int) - fast.thumbnail).mean() < 1
    assert (full.mask != fast.mask).mean() < 0.01 and fast.mask.any()
