"""`mstar` command line. Service commands live here; `training` adds its own through the
`mstar.commands` entry point, so a serving install without torch still gets a working CLI."""

from __future__ import annotations

import importlib
import sys
from importlib.metadata import entry_points

import click

from service.errors import MstarError


class _Cli(click.Group):
    """Turns expected refusals into one line on stderr and a non-zero exit, never a traceback.

    Plugins may register *lazy* commands (`add_lazy_command`): the module is imported only when that command
    runs, so `mstar tile` does not pay for importing torch and timm."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._lazy: dict[str, tuple[str, str]] = {}

    def add_lazy_command(self, name: str, target: str, short_help: str = "") -> None:
        """`target` is "package.module:attribute" of a click command."""
        self._lazy[name] = (target, short_help)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._lazy))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        cmd = super().get_command(ctx, name)
        if cmd is None and name in self._lazy:
            module, attr = self._lazy[name][0].split(":")
            try:
                cmd = getattr(importlib.import_module(module), attr)
            except ModuleNotFoundError as err:
                raise click.ClickException(f"`mstar {name}` needs the training extra ({err.name} is missing)") from err
            self.add_command(cmd, name)
        return cmd

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            if name in self.commands:
                cmd = self.commands[name]
                if not cmd.hidden:
                    rows.append((name, cmd.get_short_help_str(formatter.width - 6 - len(name))))
            else:
                rows.append((name, self._lazy[name][1]))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        from pydantic import ValidationError

        try:
            return super().invoke(ctx)
        except MstarError as err:
            click.echo(f"error [{err.code}]: {err}", err=True)
            sys.exit(2)
        except ValidationError as err:  # a setting (MSTAR_* variable or .env) the settings classes refuse
            prefix = _SETTINGS_PREFIX.get(err.title)
            if prefix is None:
                raise
            for e in err.errors():
                name = prefix + "_".join(str(p) for p in e["loc"]).upper()
                click.echo(f"error [invalid_settings]: {name} (environment or .env): {e['msg']}", err=True)
            sys.exit(2)


# the settings classes' environment prefixes (service/config.py, service/pacs/config.py), by class name
_SETTINGS_PREFIX = {"Settings": "MSTAR_", "PacsSettings": "MSTAR_PACS_"}


@click.group(cls=_Cli)
@click.version_option(package_name="mstar")
def main() -> None:
    """mSTAR: multimodal whole-slide pathology foundation model, training and serving."""


def _load_commands() -> None:
    # Each module registers its command on `main` when imported; a module not written yet is skipped.
    for module in ("tile", "analyze", "heatmap", "serve", "keys", "worker", "batch", "pacs"):
        try:
            __import__(f"service.cli.{module}")
        except ModuleNotFoundError as err:
            if err.name != f"service.cli.{module}":
                raise
    for ep in entry_points(group="mstar.commands"):
        try:
            ep.load()(main)
        except ModuleNotFoundError as err:  # training extra not installed: serving-only image
            click.echo(f"note: {ep.name} commands unavailable ({err.name} not installed)", err=True)


_load_commands()
