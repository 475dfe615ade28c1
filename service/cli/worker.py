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
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    default=None,
    help="serve Prometheus metrics of all pool processes on this port (default MSTAR_WORKER_METRICS_PORT; off)",
)
def worker(
    queues: str,
    concurrency: int,
    name: str | None,
    broker: str | None,
    data_dir: str | None,
    pool: str,
    metrics_port: int | None,
) -> None:
    """Run jobs from the broker (settings from MSTAR_* variables; see docs/workers.md)."""
    import logging
    import os
    import re
    import socket
    import time

    from sqlalchemy.exc import DBAPIError

    from service.config import Settings
    from service.errors import InvalidParameterError
    from service.jobs.celery_app import QUEUES
    from service.jobs.resources import close_stores, open_store
    from service.obs.logs import configure_logging
    from service.worker.tasks import worker_app

    overrides = {k: v for k, v in {"broker_url": broker, "data_dir": data_dir}.items() if v is not None}
    settings = Settings(**overrides)
    wanted = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = [q for q in wanted if q not in QUEUES]
    if not wanted or unknown:
        raise InvalidParameterError(f"unknown queue(s) {unknown or queues!r}; choose from {', '.join(QUEUES)}")
    configure_logging(settings.log_level, settings.log_format)
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
    node = name or f"mstar-{os.getpid()}@{socket.gethostname()}"
    port = metrics_port or settings.worker_metrics_port
    if port:  # before the pool forks: every child then writes its own files in the folder the master serves
        from service.obs import worker_metrics

        folder = settings.data_dir / "prometheus" / re.sub(r"[^A-Za-z0-9._-]", "_", node)
        worker_metrics.enable(folder)
        worker_metrics.serve(port)
        logging.getLogger("mstar.worker").info("metrics on :%d (multiprocess files in %s)", port, folder)
    from service.obs import tracing

    if tracing.setup("mstar-worker"):  # OTEL_* configured: task spans continue the publisher's trace
        tracing.instrument_celery()
    app = worker_app(settings)
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
