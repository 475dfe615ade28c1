"""Writers for derived containers of the same real pixels (CMU-1-Small-Region), shared by the slide tests.

`write_generic_tiff` makes a tiled JPEG pyramid as separate IFDs (OpenSlide "generic-tiff");
`write_ome_tiff` makes a pyramidal OME-TIFF with the reduced levels in SubIFDs (OpenSlide sees only level 0).
Both: 256-px JPEG tiles, µm/px in the resolution tags (cm), and OME PhysicalSize for the OME file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import tifffile
from PIL import Image

TILE = 256
JPEG_QUALITY = 90


def svs_pyramid(src: Path, levels: int = 4) -> tuple[list[np.ndarray], float]:
    """Level-0 RGB pixels of `src` and 2x box-filtered reductions, plus its µm/px."""
    with openslide.OpenSlide(str(src)) as s:
        rgba = s.read_region((0, 0), 0, s.dimensions)
        mpp = float(s.properties["openslide.mpp-x"])
    img = rgba.convert("RGB")
    out = [np.asarray(img)]
    for _ in range(levels - 1):
        img = img.resize((max(1, img.width // 2), max(1, img.height // 2)), Image.Resampling.BOX)
        out.append(np.asarray(img))
    return out, mpp


def _common(mpp: float, scale: int) -> dict:
    px_per_cm = 10_000.0 / (mpp * scale)
    return {
        "tile": (TILE, TILE),
        "photometric": "rgb",
        "compression": "jpeg",
        "compressionargs": {"level": JPEG_QUALITY},
        "resolution": (px_per_cm, px_per_cm),
        "resolutionunit": "CENTIMETER",
    }


def write_generic_tiff(src: Path, out: Path, levels: int = 4) -> Path:
    """Tiled JPEG pyramid, one IFD per level (reduced levels flagged as such)."""
    pyr, mpp = svs_pyramid(src, levels)
    with tifffile.TiffWriter(out) as tif:
        for i, arr in enumerate(pyr):
            tif.write(arr, subfiletype=1 if i else 0, **_common(mpp, 2**i))
    return out


def write_ome_tiff(src: Path, out: Path, levels: int = 4) -> Path:
    """Pyramidal OME-TIFF: level 0 in the main IFD, reductions in its SubIFDs."""
    pyr, mpp = svs_pyramid(src, levels)
    meta = {"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm",
            "PhysicalSizeY": mpp, "PhysicalSizeYUnit": "µm"}
    with tifffile.TiffWriter(out, ome=True) as tif:
        tif.write(pyr[0], subifds=len(pyr) - 1, metadata=meta, **_common(mpp, 1))
        for i, arr in enumerate(pyr[1:], start=1):
            tif.write(arr, subfiletype=1, **_common(mpp, 2**i))
    return out


def write_both(src: Path, folder: Path) -> tuple[Path, Path]:
    """Both derived containers in `folder` (use from a session-scoped fixture: ~0.5 s)."""
    return (write_generic_tiff(src, folder / "cmu.generic-tiled.tif"),
            write_ome_tiff(src, folder / "cmu.pyramid.ome.tif"))
