"""`mstar train ...`: the training stages as subcommands.

Subcommands are imported lazily from `_SUBCOMMANDS` (module -> click command attribute), so each stage module owns
its command and a stage not written yet is simply absent. Launch several processes with
`torchrun --nproc_per_node N $(which mstar) train stage1 --config FILE`.
"""

from __future__ import annotations

import importlib

import click

_SUBCOMMANDS = {
    "training.stage1": "stage1_command",
    "training.stage2": "stage2_command",
    "training.downstream_cli": "downstream_command",
}


class _LazyGroup(click.Group):
    def _load(self) -> None:
        for module, attr in _SUBCOMMANDS.items():
            try:
                mod = importlib.import_module(module)
            except ModuleNotFoundError as err:
                if err.name == module:
                    continue
                raise
            cmd = getattr(mod, attr)
            self.commands.setdefault(cmd.name, cmd)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        self._load()
        return super().get_command(ctx, name)


@click.group("train", cls=_LazyGroup)
def train() -> None:
    """Pretraining stages: stage1 (multimodal slide-level), stage2 (self-taught patch extractor)."""
