"""`mstar heatmap RESULT_DIR --level N`: re-render a saved analysis' scores at any pyramid level (no model run)."""

from __future__ import annotations

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
    "--out",
    "out_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="PNG to write. Default: RESULT_DIR/heatmap-level{N}[-SCORE].png",
)
def heatmap(
    result_dir: Path, level: int | None, score: str, slide_path: Path | None, alpha: float, out_path: Path | None
) -> None:
    """Write the per-patch SCORE of RESULT_DIR (from patch_scores.h5) as a PNG the size of pyramid LEVEL.

    Without --slide the PNG is transparent where no patch was analysed, ready to lay over the slide in a viewer."""
    from service.results import heatmap_levels, patch_scores

    res_file, ps_file = result_dir / "result.json", result_dir / patch_scores.FILE_NAME
    if not res_file.is_file() or not ps_file.is_file():
        raise MstarError(f"{result_dir}: needs result.json and {patch_scores.FILE_NAME} (an analysis with a bundle)")
    result = json.loads(res_file.read_text())
    dims = result["slide"]["level_dimensions"]
    level = len(dims) - 1 if level is None else level
    scores = patch_scores.read(ps_file)
    background = None
    if slide_path is not None:
        background = _slide_level(slide_path, result, level, dims)
    rgba = heatmap_levels.render_rgba(scores, dims, level, score=score, alpha=alpha, background=background)
    suffix = "" if score == "attention" else "-" + "".join(c if c.isalnum() else "_" for c in score)
    out_path = out_path or result_dir / f"heatmap-level{level}{suffix}.png"
    heatmap_levels.write_png(out_path, rgba)
    click.echo(
        json.dumps(
            {
                "png": str(out_path),
                "level": level,
                "size": [rgba.shape[1], rgba.shape[0]],
                "score": score,
                "patches": len(scores.coords),
            }
        )
    )


def _slide_level(slide_path: Path, result: dict, level: int, dims: list):
    """The whole of `level` read from the slide, after checking it is the slide that was analysed."""
    from service.pipeline import slide_fingerprint
    from service.results.heatmap_levels import level_size
    from service.slides.open import open_slide

    w, h = level_size(dims, level)
    if slide_fingerprint(slide_path) != result["slide"]["sha256"]:
        raise MstarError(f"{slide_path.name} is not the slide this result was computed from (content differs)")
    mpp = (result.get("options") or {}).get("mpp_override")
    with open_slide(slide_path, mpp_override=mpp) as reader:
        return reader.read_region((0, 0), level, (w, h))
