"""Training commands, registered on the `mstar` group through the `mstar.commands` entry point.

Heavy imports (torch) happen inside each command so `mstar --help` stays fast.
"""

from __future__ import annotations

import importlib
import importlib.util

import click

# command name -> ("module:attribute" of its click command, short help). Registered lazily: a module is
# imported only when its command runs, so service commands do not pay for importing torch and timm.
_COMMANDS = {
    "synth": ("training.data.synth_cli:synth", "Generate a synthetic multimodal cohort with known ground truth."),
    "train": ("training.train_cli:train", "Pretraining (stage1, stage2) and downstream heads."),
    "eval": ("training.downstream_cli:eval_command", "Evaluate a run: report.md, metrics.json and plots."),
    "export": ("training.export_cli:export", "Export a training run to a Triton model repository + bundle."),
    "import-encoder": ("training.import_encoder_cli:import_encoder_cmd",
                       "Build a bundle around a released ViT-L checkpoint (mSTAR/UNI) from a local file."),
    "extract": ("training.extract:extract", "Extract patch features for a cohort or a folder of slides."),
}


def register(group: click.Group) -> None:
    for name, (target, short_help) in _COMMANDS.items():
        module = target.split(":")[0]
        if importlib.util.find_spec(module) is None:
            continue  # not present in this install
        group.add_lazy_command(name, target, short_help)
