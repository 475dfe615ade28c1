"""`mstar pacs ...`: hospital PACS integration commands (see docs/pacs.md)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import click

from service.cli import main


@main.group("pacs")
def pacs_group() -> None:
    """Hospital PACS integration over DICOMweb."""


@pacs_group.command("watch")
@click.option("--pacs", "pacs_name", required=True, help="name of a configured server (MSTAR_PACS_SERVERS)")
@click.option("--tenant", default=None, help="the server's tenant, when several tenants name a server alike")
@click.option("--gateway", envvar="MSTAR_GATEWAY_URL", required=True, help="the service's base URL")
@click.option("--api-key", envvar="MSTAR_WATCH_API_KEY", required=True, help="the tenant's API key")
@click.option(
    "--state",
    "state_path",
    type=click.Path(path_type=Path),
    default=Path("mstar-data/pacs-watch.db"),
    show_default=True,
    help="SQLite file remembering submitted series (keep it across restarts)",
)
@click.option("--interval", type=float, default=60.0, show_default=True, help="seconds between polls")
@click.option("--study-date-from", default=None, help="only studies on or after YYYYMMDD")
@click.option(
    "--once",
    is_flag=True,
    help="poll once and exit: status 1 when a series was not submitted (it is tried again by the next poll)",
)
def watch(
    pacs_name: str,
    tenant: str | None,
    gateway: str,
    api_key: str,
    state_path: Path,
    interval: float,
    study_date_from: str | None,
    once: bool,
) -> None:
    """Poll the PACS (QIDO-RS) for new slide series and submit each one once."""
    from service.pacs.config import PacsNotConfiguredError, PacsSettings
    from service.pacs.watch import WatchState, gateway_submitter, poll_once

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    servers = [
        s for s in PacsSettings().all_servers() if s.name == pacs_name and (tenant is None or s.tenant == tenant)
    ]
    if len(servers) != 1:
        raise PacsNotConfiguredError(
            f"{len(servers)} configured servers named {pacs_name!r}" + ("" if tenant else "; pass --tenant")
        )
    state = WatchState(state_path)
    submit = gateway_submitter(gateway, api_key, pacs_name)
    while True:
        refused: list = []
        try:
            done = poll_once(servers[0], state, submit, study_date_from=study_date_from, refused=refused)
            click.echo(f"submitted {len(done)} new series")
            for study, series, job in done:
                click.echo(f"{study} {series} {job}")
        except Exception as err:  # the PACS or gateway down: log and poll again; --once reports it
            if once:
                raise
            logging.getLogger("mstar.pacs.watch").warning("poll failed: %s", err)
        if once:
            if refused:  # a cron job or systemd timer sees it; the series stay unrecorded, so a later run retries
                click.echo(f"{len(refused)} series not submitted (see the log); the next poll tries them again")
                raise SystemExit(1)
            return
        time.sleep(interval)
