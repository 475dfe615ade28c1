"""What nvImageCodec returns for Aperio 33003 tiles (YCbCr JPEG 2000, chroma halved horizontally, no colour
transform in the codestream), which the batch decoder leaves to the CPU today: its output shape and pixels
for the colour and sample settings that could carry stored components, against OpenJPEG's components
(`decode_aperio_ycbcr`'s input). Run on a GPU machine by `bench/gpu/tiles.sh run`; prints one line a setting.

    python bench/gpu/probe_j2k.py SLIDE.svs [--kind nvimgcodec]
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from service.slides import openjpeg  # noqa: E402
from service.slides.batchdecode import BatchDecoder  # noqa: E402
from service.slides.fasttiles import open_tiff_level  # noqa: E402


def _first_plane_diff(got: np.ndarray | None, y: np.ndarray) -> int | None:
    """Max |first channel (interleaved [H, W, C]) or plane (planar [C, H, W]) - Y|; None where neither fits."""
    if got is None or got.ndim != 3:
        return None
    if got.shape[:2] == y.shape:
        return int(np.abs(got[..., 0].astype(int) - y).max())
    if got.shape[1:] == y.shape:
        return int(np.abs(got[0].astype(int) - y).max())
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("slide", type=Path)
    ap.add_argument("--kind", default="nvimgcodec")
    args = ap.parse_args(argv)
    import tifffile

    with tifffile.TiffFile(args.slide) as tif:
        page = tif.pages[0]
        level = open_tiff_level(args.slide, page.imagewidth, page.imagelength)
    nv = importlib.import_module("nvidia.nvimgcodec")
    dec = BatchDecoder(args.kind)._new_decoder()
    keys = [(x, y) for y in range(min(2, level.tiles_y)) for x in range(min(4, level.tiles_x))]
    streams = [level._stored(y * level.tiles_x + x) for x, y in keys]
    refs = [openjpeg.decode_components(s, 0, expect_size=(level.tile_w, level.tile_h)) for s in streams]
    print("reference components (OpenJPEG):", [p.shape for p in refs[0]])
    settings = {
        "SRGB, interleaved": nv.DecodeParams(apply_exif_orientation=False),
        "UNCHANGED, I_UNCHANGED": nv.DecodeParams(
            apply_exif_orientation=False, color_spec=nv.ColorSpec.UNCHANGED, sample_format=nv.SampleFormat.I_UNCHANGED
        ),
        "UNCHANGED, P_UNCHANGED": nv.DecodeParams(
            apply_exif_orientation=False, color_spec=nv.ColorSpec.UNCHANGED, sample_format=nv.SampleFormat.P_UNCHANGED
        ),
        "SYCC, P_YUV": nv.DecodeParams(
            apply_exif_orientation=False, color_spec=nv.ColorSpec.SYCC, sample_format=nv.SampleFormat.P_YUV
        ),
    }
    for name, params in settings.items():
        try:
            images = dec.decode(streams, params=params)
        except Exception as exc:
            print(f"{name:24s} refused: {exc}")
            continue
        got = [None if im is None else np.asarray(im.cpu()) for im in images]
        shapes = sorted({None if g is None else g.shape for g in got}, key=str)
        y_diff = [_first_plane_diff(g, r[0]) for g, r in zip(got, refs, strict=True)]
        print(f"{name:24s} shapes {shapes}  |first channel - Y| max per tile {y_diff}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
