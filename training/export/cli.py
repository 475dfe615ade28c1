"""The export commands: `mstar export RUN_DIR --out DIR`, `mstar export-runs --encoder ... --out DIR` and
`mstar import-encoder CHECKPOINT --out DIR`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from training.export.bundle import export_run
from training.export.import_encoder import import_encoder


@click.command("export")
@click.argument("run_dir", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--out",
    "out",
    type=click.Path(path_type=Path),
    default=Path("model_repository"),
    show_default=True,
    help="Bundle directory (a Triton model repository with bundle.json).",
)
@click.option(
    "--zeroshot-run",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="A `mstar train downstream` zero-shot run: serve the method, top-k and logit scale it selected on "
    "validation (default: what export.pt records, else MI-Zero top-50 at 14.29).",
)
def export(run_dir: Path, out: Path, zeroshot_run: Path | None) -> None:
    """Export a training run's models to ONNX, a Triton repository and a bundle manifest (parity-checked)."""
    rep = export_run(run_dir, out, zeroshot_run=zeroshot_run, progress=lambda m: click.echo(m, err=True))
    click.echo(json.dumps(rep.summary(), indent=2))


def _pairs(heads: tuple[str, ...]) -> list[tuple[str, Path]]:
    pairs = []
    for h in heads:
        head_name, sep, path = h.partition("=")
        if not sep or not head_name or not path:
            raise click.BadParameter(f"expected NAME=PATH, got {h!r}", param_hint="--head")
        pairs.append((head_name, Path(path)))
    return pairs


@click.command("export-runs")
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, help="Bundle directory to write.")
@click.option(
    "--encoder",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="Patch encoder weights: Stage 2's student_backbone.pt (its .json sidecar names the architecture and the "
    "scale it learnt at), or a released ViT file with --arch.",
)
@click.option("--arch", default=None, help="Patch encoder configuration, where the weights have no sidecar.")
@click.option(
    "--stage1",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="A Stage-1 last.pt: the slide aggregator (slide embeddings) and its text tower (zero-shot), if any.",
)
@click.option("--head", "heads", multiple=True, metavar="NAME=PATH", help="A classification/survival head.pt.")
@click.option(
    "--report",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="A report-generation head.pt.",
)
@click.option(
    "--zeroshot-run",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="A zero-shot run: serve the method it selected on validation (needs --stage1 with a text tower).",
)
@click.option("--target-mpp", type=float, default=None, help="µm/px to serve at (default: the sidecar's, else 0.5).")
@click.option("--field-um", type=float, default=None, help="µm per patch side (default: the sidecar's, else arch's).")
@click.option("--name", default="mstar", show_default=True, help="Bundle name.")
def export_runs_cmd(
    out: Path,
    encoder: Path,
    arch: str | None,
    stage1: Path | None,
    heads: tuple[str, ...],
    report: Path | None,
    zeroshot_run: Path | None,
    target_mpp: float | None,
    field_um: float | None,
    name: str,
) -> None:
    """Export the runs of `mstar train` into one bundle (ONNX, Triton repository, manifest; parity-checked)."""
    from training.export.assemble import export_runs

    rep = export_runs(
        out,
        zeroshot_run=zeroshot_run,
        progress=lambda m: click.echo(m, err=True),
        encoder=encoder,
        arch=arch,
        stage1=stage1,
        heads=_pairs(heads),
        report=report,
        target_mpp=target_mpp,
        field_um=field_um,
        name=name,
    )
    click.echo(json.dumps(rep.summary(), indent=2))


@click.command("import-encoder")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, help="Bundle directory to write.")
@click.option(
    "--arch",
    default="mstar_vit_l16",
    show_default=True,
    help="Patch encoder configuration (training.models.patch_encoder.PATCH_ENCODERS).",
)
@click.option("--target-mpp", type=float, default=0.5, show_default=True, help="µm/px the encoder was trained at.")
@click.option(
    "--field-um",
    type=float,
    default=None,
    help="µm of tissue per patch side (default: the architecture's; mstar_vit_l16/uni_vit_l16: 128, the official "
    "256 px at 0.5 µm/px resized to 224).",
)
@click.option(
    "--head",
    "heads",
    multiple=True,
    metavar="NAME=PATH",
    help="A head trained on this encoder's features (`mstar train downstream` head.pt); repeatable.",
)
@click.option("--name", default=None, help="Bundle name (default: the checkpoint's file name).")
def import_encoder_cmd(
    checkpoint: Path,
    out: Path,
    arch: str,
    target_mpp: float,
    field_um: float | None,
    heads: tuple[str, ...],
    name: str | None,
) -> None:
    """Build a bundle around a released mSTAR/UNI ViT checkpoint (a local file), with heads trained on it."""
    rep = import_encoder(
        checkpoint,
        out,
        arch=arch,
        target_mpp=target_mpp,
        field_um=field_um,
        heads=_pairs(heads),
        name=name,
        progress=lambda m: click.echo(m, err=True),
    )
    click.echo(json.dumps(rep.summary(), indent=2))


@click.command("export-fusion")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--bundle", "bundle_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
def export_fusion_cmd(run_dir: Path, bundle_dir: Path) -> None:
    """Add the slide + RNA head of RUN_DIR (`--modalities wsi,rna`) to a bundle: ONNX, gene list, manifest."""
    from training.export.fusion import add_to_bundle

    res = add_to_bundle(run_dir / "head.pt", bundle_dir)
    click.echo(json.dumps({"onnx": res["onnx"], "max_abs": res["max_abs"], "min_cosine": res["min_cosine"]}))
