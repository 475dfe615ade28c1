"""`mstar tile`: tissue mask + patch grid of one slide, written as a CLAM/TRIDENT coordinates file."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from service.cli import main


@main.command()
@click.argument("slide", type=click.Path(path_type=Path))  # a missing one: error [slide_not_found]
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="HDF5 file to write (dataset `coords` + geometry attributes).",
)
@click.option("--mpp", "target_mpp", default=0.5, show_default=True, type=float, help="Target µm per pixel.")
@click.option("--patch-size", default=224, show_default=True, type=int, help="Patch side in output pixels.")
@click.option(
    "--mpp-override",
    default=None,
    type=float,
    help="Level-0 µm/px to use instead of the file's metadata (needed when the slide has none).",
)
@click.option(
    "--tissue-threshold",
    default=0.25,
    show_default=True,
    type=float,
    help="Minimum tissue fraction for a patch to be kept.",
)
@click.option("--overlap", default=0, show_default=True, type=int, help="Output pixels shared by neighbours.")
@click.option(
    "--mpp-tolerance",
    default=0.05,
    show_default=True,
    type=float,
    help="Relative tolerance for reading a native level as is.",
)
@click.option("--allow-upsample", is_flag=True, help="Allow targets finer than the slide's level 0.")
@click.option("--mask-mpp", default=8.0, show_default=True, type=float, help="µm/px of the tissue mask.")
@click.option(
    "--thumbnail",
    "thumbnail",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write a PNG of the thumbnail with the tissue contour and the grid.",
)
def tile(
    slide: Path,
    out: Path,
    target_mpp: float,
    patch_size: int,
    mpp_override: float | None,
    tissue_threshold: float,
    overlap: int,
    mpp_tolerance: float,
    allow_upsample: bool,
    mask_mpp: float,
    thumbnail: Path | None,
) -> None:
    """Segment tissue and write the patch grid of SLIDE at a target µm/px."""
    from service.slides.grid import build_grid
    from service.slides.h5io import write_h5
    from service.slides.open import open_slide
    from service.slides.tissue import TissueParams

    t0 = time.perf_counter()
    with open_slide(slide, mpp_override=mpp_override) as reader:
        grid = build_grid(
            reader,
            target_mpp=target_mpp,
            patch_size=patch_size,
            tissue_threshold=tissue_threshold,
            overlap=overlap,
            mpp_tolerance=mpp_tolerance,
            allow_upsample=allow_upsample,
            tissue_params=TissueParams(mask_mpp=mask_mpp),
        )
        grid_s = time.perf_counter() - t0
        write_h5(out, grid, name=slide.stem if slide.is_file() else slide.name)
        if thumbnail is not None:
            from service.slides.preview import write_preview

            write_preview(thumbnail, grid, reader)
        summary = {
            "slide": slide.name,
            "vendor": reader.vendor,
            **grid.summary(),
            "tissue_fraction": round(grid.mask.tissue_fraction, 4) if grid.mask is not None else None,
            "background": grid.mask.background if grid.mask is not None else None,
            "grid_s": round(grid_s, 3),
            "out": str(out),
        }
        if thumbnail is not None:
            summary["thumbnail"] = str(thumbnail)
    click.echo(json.dumps(summary))
