"""`mstar submit MANIFEST.csv` and `mstar batch status|results ID`: batch jobs on the distributed workers.

Two ways in:

* `--broker URL` (or MSTAR_BROKER_URL): this machine reaches the job database and the shared blob store
  (MSTAR_DATABASE_URL, MSTAR_DATA_DIR) and publishes straight onto the `batch` queue.
* `--server URL`: only the HTTP gateway is reachable; each slide is uploaded through the API (`POST /slides`)
  and the batch is tracked in a local file under `~/.mstar/batches/` (or `--state-dir`).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from service.cli import main


def _settings(broker: str | None, data_dir: str | None):
    from service.config import Settings

    overrides = {k: v for k, v in {"broker_url": broker, "data_dir": data_dir}.items() if v is not None}
    return Settings(**overrides)


def _bar_line(counts: dict[str, int], patches: int, elapsed: float) -> str:
    rate = patches / elapsed if elapsed > 0 else 0.0
    return (
        f"done {counts['succeeded']}  failed {counts['failed'] + counts.get('canceled', 0)}  "
        f"remaining {counts['remaining']}  |  {rate:.1f} patches/s"
    )


def _follow(service, batch_id: str, total: int, poll_s: float) -> dict[str, int]:
    """A progress bar (tqdm, on stderr) until every item of the batch is terminal."""
    from tqdm import tqdm

    t0 = time.monotonic()
    counts: dict[str, int] = {}
    before: int | None = None  # patches of slides done before this submission (a resumed batch)
    with tqdm(total=total, unit="slide", file=sys.stderr, dynamic_ncols=True) as bar:
        for st in service.iter_until_done(batch_id, poll_s=poll_s):
            counts = st.counts()
            patches = sum(service.patches(it) or 0 for it in st.items)
            before = patches if before is None else before
            patches -= before
            finished = counts["total"] - counts["remaining"]
            bar.update(finished - bar.n)
            bar.set_postfix_str(_bar_line(counts, patches, time.monotonic() - t0), refresh=True)
    return counts


@main.command()
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False))
@click.option("--broker", default=None, help="Celery broker URL (overrides MSTAR_BROKER_URL)")
@click.option("--server", default=None, help="gateway URL: upload through the HTTP API instead")
@click.option("--api-key", envvar="MSTAR_API_KEY", default=None, help="for --server (or MSTAR_API_KEY)")
@click.option("--tenant", default="default", show_default=True, help="tenant the batch belongs to (--broker)")
@click.option("--batch-id", default=None, help="32 hex chars; default: stable per tenant and manifest path")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None, help="overrides MSTAR_DATA_DIR")
@click.option("--state-dir", type=click.Path(file_okay=False), default=None, help="--server batch records")
@click.option("--wait/--no-wait", default=True, show_default=True, help="follow with a progress bar")
@click.option("--poll", "poll_s", type=float, default=1.0, show_default=True)
def submit(
    manifest: str,
    broker: str | None,
    server: str | None,
    api_key: str | None,
    tenant: str,
    batch_id: str | None,
    data_dir: str | None,
    state_dir: str | None,
    wait: bool,
    poll_s: float,
) -> None:
    """Queue every slide of MANIFEST.csv as one batch; resubmitting skips slides already done."""
    from service.errors import InvalidParameterError

    if server and broker:
        raise InvalidParameterError("give --server or --broker, not both")
    if server:
        from service.batch_http import HttpBatch

        hb = HttpBatch(server, api_key, state_dir)
        rep = hb.submit(manifest, batch_id=batch_id)
        click.echo(json.dumps(rep))
        if wait:
            counts = hb.follow(rep["batch_id"], poll_s=poll_s)
            click.echo(json.dumps({"batch_id": rep["batch_id"], **counts}))
        return
    from service.batch import BatchService
    from service.jobs.celery_queue import CeleryQueue

    settings = _settings(broker, data_dir)
    if not settings.broker_url:
        raise InvalidParameterError("give --broker URL (or MSTAR_BROKER_URL), or --server URL")
    service = BatchService(settings)
    queue = CeleryQueue(settings, default_queue="batch")
    try:
        rep = service.submit(manifest, tenant=tenant, batch_id=batch_id, queue=queue)
        click.echo(
            json.dumps(
                {
                    "batch_id": rep.batch_id,
                    "queued": len(rep.queued),
                    "skipped_done": rep.skipped_done,
                    "in_flight": rep.in_flight,
                    "failed_ingest": rep.failed_ingest,
                }
            )
        )
        if wait:
            total = len(service.status(rep.batch_id).items)
            counts = _follow(service, rep.batch_id, total, poll_s)
            click.echo(json.dumps({"batch_id": rep.batch_id, **counts}))
    finally:
        queue.stop()
        service.close()


@main.group()
def batch() -> None:
    """Inspect batches submitted with `mstar submit`."""


@batch.command("status")
@click.argument("batch_id")
@click.option("--server", default=None, help="the batch was submitted with --server")
@click.option("--api-key", envvar="MSTAR_API_KEY", default=None)
@click.option("--state-dir", type=click.Path(file_okay=False), default=None)
@click.option("--data-dir", type=click.Path(file_okay=False), default=None, help="overrides MSTAR_DATA_DIR")
@click.option("--json", "as_json", is_flag=True, help="per-slide states as JSON")
def batch_status(
    batch_id: str, server: str | None, api_key: str | None, state_dir: str | None, data_dir: str | None, as_json: bool
) -> None:
    """Counts (and with --json, each slide's state and reason)."""
    if server:
        from service.batch_http import HttpBatch

        items = HttpBatch(server, api_key, state_dir).status(batch_id)
        counts: dict[str, int] = {}
        for it in items:
            counts[it["state"]] = counts.get(it["state"], 0) + 1
        click.echo(json.dumps({"batch_id": batch_id, "counts": counts, "items": items if as_json else None}))
        return
    from service.batch import BatchService

    service = BatchService(_settings(None, data_dir))
    try:
        st = service.status(batch_id)
        out: dict = {"batch_id": batch_id, "name": st.name, "counts": st.counts()}
        if as_json:
            out["items"] = [
                {
                    "idx": it.idx,
                    "name": it.name,
                    "state": it.state,
                    "error_code": it.error_code,
                    "reason": it.reason,
                    "attempts": it.attempts,
                    "job_id": it.job_id,
                    "stage": it.stage,
                    "progress": it.progress,
                }
                for it in st.items
            ]
        click.echo(json.dumps(out))
    finally:
        service.close()


@batch.command("results")
@click.argument("batch_id")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True)
@click.option("--server", default=None, help="the batch was submitted with --server")
@click.option("--api-key", envvar="MSTAR_API_KEY", default=None)
@click.option("--state-dir", type=click.Path(file_okay=False), default=None)
@click.option("--data-dir", type=click.Path(file_okay=False), default=None, help="overrides MSTAR_DATA_DIR")
def batch_results(
    batch_id: str, out_dir: str, server: str | None, api_key: str | None, state_dir: str | None, data_dir: str | None
) -> None:
    """Gather features (features/*.h5) and summary.csv (+ summary.parquet with pyarrow) into OUT."""
    if server:
        from service.batch_http import HttpBatch

        path = HttpBatch(server, api_key, state_dir).results(batch_id, Path(out_dir))
    else:
        from service.batch import BatchService

        service = BatchService(_settings(None, data_dir))
        try:
            path = service.results(batch_id, out_dir)
        finally:
            service.close()
    click.echo(str(path))
