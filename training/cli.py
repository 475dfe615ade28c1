"""The training commands of `mstar`, registered through the `mstar.commands` entry point, all loaded lazily.

One mechanism for every command, the `mstar` group's own `add_lazy_command`: a table of `"module:attribute"` click
commands with their short help, imported only when the command runs, so `mstar --help`, `mstar train --help` and
the service commands never pay for importing torch and timm. `mstar train` is a group of the same class as `mstar`,
holding the stages as lazy commands. Launch several processes with
`torchrun --nproc_per_node N $(which mstar) train stage1 --config FILE`.
"""

from __future__ import annotations

import click

# command name -> ("module:attribute" of its click command, short help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("training.data.synth_cli:synth", "Generate a synthetic multimodal cohort with known ground truth."),
    "eval": ("training.downstream.cli:eval_command", "Evaluate a run: report.md, metrics.json and plots."),
    "export": ("training.export.cli:export", "Export a training run to a Triton model repository + bundle."),
    "export-runs": (
        "training.export.cli:export_runs_cmd",
        "Export the runs of mstar train (Stage 2 encoder, Stage 1 aggregator, heads) into one bundle.",
    ),
    "export-fusion": (
        "training.export.cli:export_fusion_cmd",
        "Add a slide + RNA head (train downstream --modalities wsi,rna) to a bundle.",
    ),
    "import-encoder": (
        "training.export.cli:import_encoder_cmd",
        "Build a bundle around a released ViT-L checkpoint (mSTAR/UNI) from a local file.",
    ),
    "extract": ("training.extract:extract", "Extract patch features for a cohort or a folder of slides."),
}
TRAIN_COMMANDS: dict[str, tuple[str, str]] = {
    "stage1": ("training.stage1:stage1_command", "Stage 1: multimodal slide-level pretraining."),
    "stage2": ("training.stage2:stage2_command", "Stage 2: self-taught training of the patch extractor."),
    "downstream": ("training.downstream.cli:downstream_command", "Train or evaluate one downstream task."),
}


def register(group: click.Group) -> None:
    """The `mstar.commands` entry point: every training command, lazily, on the `mstar` group (whose class has
    `add_lazy_command`; `service.cli`)."""
    for name, (target, short_help) in COMMANDS.items():
        group.add_lazy_command(name, target, short_help)
    train = type(group)(
        "train",
        help="Pretraining stages: stage1 (multimodal slide-level), stage2 (self-taught patch extractor), and the "
        "downstream tasks.",
        short_help="Pretraining (stage1, stage2) and downstream heads.",
    )
    for name, (target, short_help) in TRAIN_COMMANDS.items():
        train.add_lazy_command(name, target, short_help)
    group.add_command(train)
