"""`mstar worker`: a Celery worker that runs analysis jobs from the broker (MSTAR_BROKER_URL)."""

from __future__ import annotations

import click

from service.cli import main


@main.command()
@click.option(
    "--queues",
    "-Q",
    default="interactive,batch",
    show_default=True,
    help="queues to consume, in order of preference (interactive first)",
)
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(1, 256),
    default=1,
    show_default=True,
    help="pool processes (one job each)",
)
@click.option("--name", "-n", default=None, help="node name (default mstar-<pid>@<host>)")
@click.option("--broker", default=None, help="overrides MSTAR_BROKER_URL")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None, help="overrides MSTAR_DATA_DIR")
@click.option(
    "--pool",
    type=click.Choice(["prefork", "solo"]),
    default="prefork",
    show_default=True,
    help="prefork isolates decoder crashes and enforces time limits; solo for one in-process GPU model",
)
def worker(
    queues: str, concurrency: int, name: str | None, broker: str | None, data_dir: str | None, pool: str
) -> None:
    """Run jobs from the broker (settings from MSTAR_* variables; see docs/workers.md)."""
    import logging
    import os
    import socket
    import time

    from sqlalchemy.exc import DBAPIError

    from service.config import Settings
    from service.errors import InvalidParameterError
    from service.jobs.celery_app import QUEUES
    from service.jobs.resources import close_stores, open_store
    from service.worker.tasks import worker_app

    overrides = {k: v for k, v in {"broker_url": broker, "data_dir": data_dir}.items() if v is not None}
    settings = Settings(**overrides)
    wanted = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = [q for q in wanted if q not in QUEUES]
    if not wanted or unknown:
        raise InvalidParameterError(f"unknown queue(s) {unknown or queues!r}; choose from {', '.join(QUEUES)}")
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s"
    )
    for attempt in range(5):  # workers starting together race on CREATE TABLE: the loser retries, sees them
        try:
            store = open_store(settings).blobs
            break
        except DBAPIError:
            close_stores()
            if attempt == 4:
                raise
            time.sleep(0.5 + attempt)
    close_stores()  # the pool children open their own after the fork
    store.check()  # a missing bucket or rejected credentials: one line and exit 2, before taking any job
    logging.getLogger("mstar.worker").info("blob store: %s", store.describe())
    from service.jobs.execute import sweep_scratch

    if swept := sweep_scratch(settings.work_dir):  # folders of this host's killed runs
        logging.getLogger("mstar.worker").info("removed %d scratch folder(s) left by killed runs", swept)
    app = worker_app(settings)
    node = name or f"mstar-{os.getpid()}@{socket.gethostname()}"
    app.worker_main(
        [
            "worker",
            "--queues",
            ",".join(wanted),
            "--concurrency",
            str(concurrency),
            "--pool",
            pool,
            "--hostname",
            node,
            "--loglevel",
            settings.log_level.upper(),
            "--without-gossip",
            "--without-mingle",
        ]
    )
