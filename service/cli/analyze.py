"""`mstar analyze SLIDE`: the main job, one slide end to end on the embedded default (no external service)."""

from __future__ import annotations

import json
import sys
from importlib.metadata import entry_points
from pathlib import Path

import click

from service.cli import main
from service.errors import BundleError, SlideNotFoundError
from service.pipeline import DEFAULT_TASKS, TASKS, AnalysisOptions, run_analysis

REPO_BUNDLE = Path(__file__).resolve().parents[2] / "model_repository"


def default_bundle_dir() -> Path:
    """The demo bundle: `model_repository/` of a source checkout, else a per-user cache directory."""
    import os

    env = os.environ.get("MSTAR_BUNDLE_DIR")
    if env:
        return Path(env)
    if (REPO_BUNDLE.parent / "pyproject.toml").is_file():
        return REPO_BUNDLE
    return Path.home() / ".cache" / "mstar" / "model_repository"


def ensure_demo_bundle(bundle_dir: Path) -> Path:
    """Build the demo bundle on first use through the training plugin (torch is needed only then)."""
    from service.inference.bundle import load_bundle

    try:
        load_bundle(bundle_dir)
        return bundle_dir
    except BundleError as err:
        reason = str(err)
    builders = {ep.name: ep for ep in entry_points(group="mstar.bundle_builders")}
    if "demo" not in builders:
        raise BundleError(
            f"no usable bundle at {bundle_dir} ({reason}), and the training extra that builds the demo bundle "
            "is not installed; pass --bundle DIR"
        )
    click.echo(
        f"building the demo bundle in {bundle_dir} (first use: about 5 minutes on 2 idle cores, see docs/demo.md) ...",
        err=True,
    )
    builders["demo"].load()(bundle_dir, log=lambda msg: click.echo(f"  {msg}", err=True))
    load_bundle(bundle_dir)
    return bundle_dir


@main.command()
@click.argument("slide", type=click.Path(path_type=Path))  # a missing one: error [slide_not_found]
@click.option(
    "--bundle",
    "bundle_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Model bundle (Triton model repository + bundle.json). Default: the demo bundle.",
)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("out/analysis"), show_default=True)
@click.option("--task", "tasks", multiple=True, type=click.Choice(TASKS), help="Repeatable. Default: all but zeroshot.")
@click.option("--prompt", "prompts", multiple=True, help="Zero-shot class prompt (repeatable); enables zeroshot.")
@click.option(
    "--mpp", "--mpp-override", "mpp_override", type=float, default=None, help="µm/px override for slides without it."
)
@click.option("--backend", type=click.Choice(["onnxruntime", "triton"]), default="onnxruntime", show_default=True)
@click.option("--triton-url", default="127.0.0.1:8001", show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option(
    "--roi",
    "roi_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="GeoJSON region (level-0 px, e.g. a QuPath export): only patches centred inside it are read.",
)
@click.option("--geojson", is_flag=True, help="Also write OUT/annotations.geojson for QuPath (tissue + patches).")
@click.option(
    "--rna",
    "rna_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="RNA-Seq profile (Gene,Value CSV, GDC STAR or TCGA RSEM table) for the bundle's slide + RNA head.",
)
def analyze(
    slide: Path,
    bundle_dir: Path | None,
    out_dir: Path,
    tasks: tuple[str, ...],
    prompts: tuple[str, ...],
    mpp_override: float | None,
    backend: str,
    triton_url: str,
    batch_size: int,
    roi_file: Path | None,
    geojson: bool,
    rna_file: Path | None,
) -> None:
    """Tile, embed, aggregate and run every head and the report decoder on SLIDE.

    Writes OUT/result.json, OUT/features.h5, OUT/patch_scores.h5 and OUT/heatmap.png (and with --geojson
    OUT/annotations.geojson) and prints a JSON summary."""
    from service.inference.bundle import load_bundle
    from service.pipeline import open_backend
    from service.results.roi import load_region_file

    if not slide.exists():  # before a first-use bundle build, not minutes into it
        raise SlideNotFoundError(f"no such file or folder: {slide}")
    region = load_region_file(roi_file) if roi_file is not None else None

    if bundle_dir is None:
        bundle_dir = ensure_demo_bundle(default_bundle_dir())
    bundle = load_bundle(bundle_dir)
    tasks = tasks or DEFAULT_TASKS
    if prompts and "zeroshot" not in tasks:
        tasks = (*tasks, "zeroshot")
    rna = _read_rna(rna_file, bundle) if rna_file is not None else None
    options = AnalysisOptions(
        tasks=tasks, prompts=prompts, mpp_override=mpp_override, batch_size=batch_size, region=region, rna=rna
    )
    kwargs = {"url": triton_url} if backend == "triton" else {}
    if bundle.manifest.demo:
        click.echo(
            "NOTE: demo bundle (synthetic training data) - predictions are a demo, not a clinical model.", err=True
        )
    last = {"stage": None}

    def progress(stage: str, fraction: float) -> None:
        if stage != last["stage"] or fraction >= 1.0:
            last["stage"] = stage
            click.echo(f"  {stage:<10} {fraction:6.1%}", err=True)

    with open_backend(bundle, backend, **kwargs) as be:
        result = run_analysis(slide, out_dir, options, backend=be, progress=progress)
    if geojson:
        from service.results import geojson as gj

        gj.write(out_dir / "annotations.geojson", gj.build_from_dir(out_dir))
    json.dump(_summary(result, out_dir), sys.stdout, indent=2)
    sys.stdout.write("\n")


def _read_rna(path: Path, bundle) -> bytes:
    """The profile's bytes, checked against the bundle's gene list before the slide is read (a bad profile fails
    in a second, not after the analysis)."""
    from service.inference.rna_input import MAX_BYTES, map_profile, read_profile

    if bundle.manifest.rna_fusion is None:
        raise click.UsageError("this bundle has no slide + RNA head (bundle.json has no rna_fusion); drop --rna")
    if path.stat().st_size > MAX_BYTES:
        raise click.UsageError(f"{path}: larger than {MAX_BYTES // (1024 * 1024)} MiB")
    data = path.read_bytes()
    map_profile(read_profile(data), bundle.manifest.rna_fusion.genes)
    return data


def _summary(result: dict, out_dir: Path) -> dict:
    """What a person wants on the terminal; the full result is in result.json."""
    summary = {k: result[k] for k in ("status", "notice") if k in result}
    summary["patches"] = result["tiling"]["patches"]
    if "multimodal" in result:
        m = result["multimodal"]
        summary["multimodal"] = {k: m.get(k) for k in ("risk", "probabilities", "slide_only_risk", "contributions")}
    for key in ("classification", "survival"):
        if key in result:
            summary[key] = {
                name: (
                    {"label": v.get("label"), "probabilities": v.get("probabilities")}
                    if key == "classification"
                    else {"risk": v.get("risk")}
                )
                for name, v in result[key].items()
            }
    if "report" in result and result["report"].get("available"):
        summary["report"] = result["report"]["text"]
    if "zeroshot" in result:
        summary["zeroshot"] = result["zeroshot"]
    summary["files"] = sorted(str(p) for p in out_dir.iterdir() if not p.name.startswith("."))
    summary["timings_s"] = result["timings"]
    return summary
