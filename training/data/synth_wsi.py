"""Write rendered slides as real pyramidal TIFFs that OpenSlide opens.

Two containers, as scanners and converters produce them:
- `svs`: Aperio-style: tiled JPEG level 0 whose ImageDescription starts with "Aperio Image Library" and
  carries `MPP` / `AppMag`, a stripped thumbnail as the second IFD, ÷4 levels, and a label image (OpenSlide
  `aperio`).
- `tiff`: generic tiled JPEG TIFF, ÷2 levels as separate IFDs, µm/px in X/YResolution with unit centimetre
  (OpenSlide `generic-tiff`). Level 0 is streamed tile by tile from the band renderer; only ÷2 and smaller
  levels are held in memory."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import tifffile

from training.data.synth_tissue import SlideRenderer, tiles_from_bands

TILE = 256
FORMATS = ("svs", "tiff")


def _half(img: np.ndarray) -> np.ndarray:
    h, w = max(1, img.shape[0] // 2), max(1, img.shape[1] // 2)
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)


def write_slide(
    path: Path,
    renderer: SlideRenderer,
    fmt: str,
    *,
    band_rows: int = 1024,
    min_level_side: int = 256,
    label_text: str = "",
) -> list[tuple[int, int]]:
    """Render and write one slide; returns the level dimensions (W, H) written."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown slide format {fmt!r}; expected one of {FORMATS}")
    W, H, mpp = renderer.width, renderer.height, renderer.mpp
    band_rows = max(TILE, band_rows // TILE * TILE)
    half = np.zeros((H // 2, W // 2, 3), np.uint8)

    def keep_half(y0: int, rows: np.ndarray) -> None:
        r = rows[: rows.shape[0] // 2 * 2, : W // 2 * 2]
        d = _half(r)
        half[y0 // 2 : y0 // 2 + d.shape[0]] = d[: half.shape[0] - y0 // 2]

    q = renderer.stain.jpeg_quality
    common = dict(compression="jpeg", compressionargs={"level": q}, photometric="rgb", metadata=None)
    tiles = tiles_from_bands(renderer.bands(band_rows), W, TILE, keep_half)
    levels = [(W, H)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path, bigtiff=W * H > 2**31) as tw:
        if fmt == "svs":
            mag = 20 if mpp >= 0.375 else 40
            head = f"Aperio Image Library v12.0.15 \n{W}x{H} [0,0 {W}x{H}] ({TILE}x{TILE}) JPEG/RGB Q={q}"
            desc = (
                f"{head}|AppMag = {mag}|StripeWidth = 2040|ScanScope ID = SYNTH01|Filename = {path.stem}"
                f"|MPP = {mpp:g}|Left = 25.0|Top = 18.0|LineCameraSkew = 0|Date = 01/01/25|Time = 12:00:00"
            )
            tw.write(tiles, shape=(H, W, 3), dtype=np.uint8, tile=(TILE, TILE), description=desc, **common)
            # pyramid (÷4 steps) from the ÷2 level
            pyr: list[np.ndarray] = []
            lv = _half(half)  # ÷4, then ÷16, ÷64
            while max(lv.shape[:2]) >= min_level_side // 2 and len(pyr) < 3:
                pyr.append(lv)
                lv = _half(_half(lv))
            thumb = pyr[-1] if pyr else _half(half)
            s = 768 / max(thumb.shape[:2])
            if s < 1:
                thumb = cv2.resize(
                    thumb, (int(thumb.shape[1] * s), int(thumb.shape[0] * s)), interpolation=cv2.INTER_AREA
                )
            tw.write(thumb, description=f"{head} -> {thumb.shape[1]}x{thumb.shape[0]} - ", **common)
            for lvl in pyr:
                h, w = lvl.shape[:2]
                tw.write(
                    lvl,
                    tile=(TILE, TILE),
                    subfiletype=0,
                    description=f"{head} -> {w}x{h} - |AppMag = {mag}|MPP = {mpp:g}",
                    **common,
                )
                levels.append((w, h))
            label = np.full((300, 300, 3), 250, np.uint8)
            cv2.putText(label, label_text[:14], (10, 160), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (20, 20, 20), 2)
            tw.write(
                label,
                subfiletype=1,
                description=f"Aperio Image Library v12.0.15\nlabel {300}x{300}",
                compression="lzw",
                photometric="rgb",
                metadata=None,
            )
        else:
            res = (1e4 / mpp, 1e4 / mpp)
            tw.write(
                tiles,
                shape=(H, W, 3),
                dtype=np.uint8,
                tile=(TILE, TILE),
                resolution=res,
                resolutionunit="CENTIMETER",
                description="synthetic H&E (mstar synth)",
                **common,
            )
            lv, k = half, 2
            while max(lv.shape[:2]) >= min_level_side:
                h, w = lv.shape[:2]
                tw.write(
                    lv,
                    tile=(TILE, TILE),
                    subfiletype=1,
                    resolution=(res[0] / k, res[1] / k),
                    resolutionunit="CENTIMETER",
                    **common,
                )
                levels.append((w, h))
                lv, k = _half(lv), k * 2
    return levels
