"""`mstar` command line. Service commands live here; `training` adds its own through the
`mstar.commands` entry point, so a serving install without torch still gets a working CLI."""

from __future__ import annotations

import sys
from importlib.metadata import entry_points

import click

from service.errors import MstarError


class _Cli(click.Group):
    """Turns expected refusals into one line on stderr and a non-zero exit, never a traceback."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except MstarError as err:
            click.echo(f"error [{err.code}]: {err}", err=True)
            sys.exit(2)


@click.group(cls=_Cli)
@click.version_option(package_name="mstar")
def main() -> None:
    """mSTAR: multimodal whole-slide pathology foundation model, training and serving."""


def _load_commands() -> None:
    # Each module registers its command on `main` when imported; a module not written yet is skipped.
    for module in ("tile", "analyze", "serve", "keys"):
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
