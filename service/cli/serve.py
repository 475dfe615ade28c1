"""`mstar serve`: the HTTP gateway plus, unless a broker is configured, the embedded job runner."""

from __future__ import annotations

import click

from service.cli import main


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="bind address (0.0.0.0 to expose)")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--data-dir", type=click.Path(file_okay=False), default=None, help="overrides MSTAR_DATA_DIR")
@click.option(
    "--bundle",
    "bundle_dir",
    type=click.Path(exists=True),
    default=None,
    help="model bundle; overrides MSTAR_BUNDLE_DIR",
)
@click.option("--workers", type=click.IntRange(1, 64), default=None, help="runner processes (MSTAR_RUNNER_WORKERS)")
def serve(host: str, port: int, data_dir: str | None, bundle_dir: str | None, workers: int | None) -> None:
    """Serve the REST API (settings from MSTAR_* variables and .env; see docs/service.md)."""
    import uvicorn

    from service.api import create_app
    from service.config import Settings
    from service.obs.logs import configure_logging

    overrides = {
        k: v
        for k, v in {"data_dir": data_dir, "bundle_dir": bundle_dir, "runner_workers": workers}.items()
        if v is not None
    }
    settings = Settings(**overrides)
    if settings.metrics_public is None:  # scrape freely on loopback; a public bind needs an admin key
        import ipaddress

        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        settings = settings.model_copy(update={"metrics_public": loopback})
    if settings.bundle_dir is None:  # as `mstar analyze`: the demo bundle when one has been built
        from service.cli.analyze import default_bundle_dir
        from service.errors import BundleError
        from service.inference.bundle import load_bundle

        candidate = default_bundle_dir()
        try:
            load_bundle(candidate, verify_checksums=False)  # the manifest is committed; weights are built
            settings = settings.model_copy(update={"bundle_dir": candidate})
        except BundleError:
            click.echo(
                f"note: no usable demo bundle at {candidate} (build it with `mstar analyze SLIDE` once, "
                "or set MSTAR_BUNDLE_DIR); jobs will stop after tiling",
                err=True,
            )
    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings)
    # One gateway process: the embedded runner lives beside it and its workers are separate processes.
    # log_config=None: uvicorn's loggers propagate to ours (plain or JSON, with the request id)
    http = {"http": settings.http_parser}
    if settings.http_parser == "h11":  # a request head over the limit is refused, not buffered without end
        http["h11_max_incomplete_event_size"] = settings.max_header_bytes
    uvicorn.run(
        app, host=host, port=port, log_level=settings.log_level.lower(), access_log=False, log_config=None, **http
    )
