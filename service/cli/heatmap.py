"""`mstar heatmap RESULT_DIR --level N`: re-render a saved analysis' scores at any pyramid level (no model run)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import click

from service.cli import main
from service.errors import MstarError


@main.command()
@click.argument("result_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--level", type=int, default=None, help="Pyramid level (0 = full resolution). Default: the coarsest.")
@click.option(
    "--score",
    default="attention",
    show_default=True,
    help="attention, HEAD.attention or HEAD.LABEL (per-patch class probability).",
)
@click.option(
    "--slide",
    "slide_path",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="The analysed slide: blend the heatmap over this level of it (checked against the result).",
)
@click.option("--alpha", type=float, default=0.6, show_default=True, help="Opacity of the scores.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["auto", "png", "tiff"]),
    default="auto",
    show_default=True,
    help="png: one image (levels up to 64 MP); tiff: a tiled pyramidal BigTIFF, any level (level 0 of a 40x "
    "slide too); auto: png where the level fits, else tiff.",
)
@click.option(
    "--out",
    "out_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="File to write. Default: RESULT_DIR/heatmap-level{N}[-SCORE].png or .tif",
)
def heatmap(
    result_dir: Path,
    level: int | None,
    score: str,
    slide_path: Path | None,
    alpha: float,
    fmt: str,
    out_path: Path | None,
) -> None:
    """Write the per-patch SCORE of RESULT_DIR (from patch_scores.h5) as an image the size of pyramid LEVEL.

    Without --slide the image is transparent where no patch was analysed, ready to lay over the slide in a
    viewer (QuPath opens the tiled TIFF as an image and as an overlay)."""
    from service.results import heatmap_levels as hl
    from service.results import patch_scores

    res_file, ps_file = result_dir / "result.json", result_dir / patch_scores.FILE_NAME
    if not res_file.is_file() or not ps_file.is_file():
        raise MstarError(f"{result_dir}: needs result.json and {patch_scores.FILE_NAME} (an analysis with a bundle)")
    result = json.loads(res_file.read_text())
    dims = result["slide"]["level_dimensions"]
    level = len(dims) - 1 if level is None else level
    w, h = hl.level_size(dims, level, max_pixels=None if fmt != "png" else hl.MAX_PIXELS)
    if fmt == "auto":
        fmt = "png" if w * h <= hl.MAX_PIXELS else "tiff"
    scores = patch_scores.read(ps_file)
    hl.pick_scores(scores, score)  # an unknown score is refused before the slide is read
    suffix = "" if score == "attention" else "-" + "".join(c if c.isalnum() else "_" for c in score)
    out_path = out_path or result_dir / f"heatmap-level{level}{suffix}.{'png' if fmt == 'png' else 'tif'}"
    with contextlib.ExitStack() as stack:
        reader = None if slide_path is None else stack.enter_context(_analysed_slide(slide_path, result))
        if fmt == "png":
            background = None if reader is None else reader.read_region((0, 0), level, (w, h))
            hl.write_png(out_path, hl.render_rgba(scores, dims, level, score=score, alpha=alpha, background=background))
        else:
            background = None if reader is None else _window_reader(reader, level)
            hl.write_tiled_tiff(out_path, scores, dims, level, score=score, alpha=alpha, background=background)
    click.echo(
        json.dumps(
            {
                fmt: str(out_path),
                "level": level,
                "size": [w, h],
                "score": score,
                "patches": len(scores.coords),
            }
        )
    )


def _analysed_slide(slide_path: Path, result: dict):
    """The slide opened, after checking it is the slide that was analysed."""
    from service.pipeline import slide_fingerprint
    from service.slides.open import open_slide

    if slide_fingerprint(slide_path) != result["slide"]["sha256"]:
        raise MstarError(f"{slide_path.name} is not the slide this result was computed from (content differs)")
    return open_slide(slide_path, mpp_override=(result.get("options") or {}).get("mpp_override"))


def _window_reader(reader, level: int):
    """`(x, y, w, h)` in `level` pixels -> RGB of that window, for blending tile by tile."""
    ds = float(reader.level_downsamples[level])

    def read(x: int, y: int, w: int, h: int):
        return reader.read_region((round(x * ds), round(y * ds)), level, (w, h))

    return read
