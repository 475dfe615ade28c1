"""Batch throughput on the distributed workers: 1 vs 2 `mstar worker` processes on the same batch.

Run: `.venv/bin/python bench/batch.py [--slides 12] [--bundle DIR] [--database-url URL] [--json out.json]`

Starts its own Redis (`redis-server` on a free loopback port, killed at the end), a job store (SQLite under a
temporary directory unless `--database-url` names PostgreSQL), makes N distinct copies of the real CMU SVS
(a unique trailer each, so every copy is its own slide), then for 1 and for 2 workers (`--concurrency 1`
each): waits until the workers are ready, submits the batch (`BatchService.submit` + the `batch` queue) and
times it until every job is terminal. Prints slides/hour, patches/s (patches tiled, or embedded with
`--bundle`) and the scaling ratio, measured side by side in one run. Worker start-up is not timed, and neither
is ingest: the slides are copied and checked (`service.ingest`, one probe process each) once before the first
timed run, so both worker counts time the same work (submit, queue, run).
On a shared 2-core machine the ratio is bounded by the cores left over; read it as such.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.batch import BatchService  # noqa: E402
from service.config import Settings  # noqa: E402
from service.jobs.celery_queue import CeleryQueue  # noqa: E402

SLIDE = ROOT.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
MSTAR = Path(sys.executable).with_name("mstar")


def _ingest(service: BatchService, manifest: Path, tenant: str) -> None:
    """Copy and check every slide of the manifest once (untimed); the timed submits then find them stored."""
    from service.batch import parse_manifest
    from service.store import repo
    from service.store.db import transaction

    with transaction(service.sessions) as s:
        tenant_id = repo.ensure_tenant(s, tenant).id
    for row in parse_manifest(manifest):
        service.ingestor.from_source(tenant_id, row.source, mpp=row.mpp_override, name=row.name, info={})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redis(root: Path) -> tuple[subprocess.Popen, str]:
    import redis

    port = _free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(root),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            return proc, f"redis://127.0.0.1:{port}/0"
        except redis.exceptions.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def _workers(n: int, env: dict, root: Path) -> list[subprocess.Popen]:
    procs = []
    for i in range(n):
        log = (root / f"w{n}-{i}.log").open("w")
        procs.append(
            subprocess.Popen(
                [str(MSTAR), "worker", "-n", f"b{n}-{i}@bench", "-c", "1"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    deadline = time.monotonic() + 180
    for i in range(n):
        while f"b{n}-{i}@bench ready" not in (root / f"w{n}-{i}.log").read_text(errors="replace"):
            if time.monotonic() > deadline or procs[i].poll() is not None:
                raise RuntimeError((root / f"w{n}-{i}.log").read_text()[-2000:])
            time.sleep(0.2)
    return procs


def run(n_slides: int, bundle: str | None, database_url: str | None) -> list[dict]:
    root = Path(tempfile.mkdtemp(prefix="mstar-bench-batch-"))
    redis_proc, broker = _redis(root)
    rows: list[dict] = []
    try:
        slides = root / "slides"
        slides.mkdir()
        data = SLIDE.read_bytes()
        for i in range(n_slides):
            (slides / f"s{i:03d}.svs").write_bytes(data + f"bench-copy-{i}".encode())
        manifest = root / "manifest.csv"
        manifest.write_text("slide\n" + "".join(f"slides/s{i:03d}.svs\n" for i in range(n_slides)))
        values = {"MSTAR_DATA_DIR": str(root / "data"), "MSTAR_BROKER_URL": broker, "MSTAR_TASK_TIME_LIMIT_S": "600"}
        if database_url:
            values["MSTAR_DATABASE_URL"] = database_url
        if bundle:
            values["MSTAR_BUNDLE_DIR"] = str(Path(bundle).resolve())
        env = {**os.environ, **values}
        settings = Settings(**{k.removeprefix("MSTAR_").lower(): v for k, v in values.items()})
        service = BatchService(settings)
        queue = CeleryQueue(settings, default_queue="batch")
        try:
            _ingest(service, manifest, "bench")
            for n_workers in (1, 2):
                procs = _workers(n_workers, env, root)
                try:
                    t0 = time.monotonic()
                    rep = service.submit(manifest, tenant="bench", batch_id=f"{n_workers:032x}", queue=queue)
                    while not (st := service.status(rep.batch_id)).finished:
                        time.sleep(0.2)
                    wall = time.monotonic() - t0
                finally:
                    for p in procs:
                        os.killpg(p.pid, signal.SIGKILL)
                        p.wait()
                counts = st.counts()
                patches = sum(service.patches(it) or 0 for it in st.items)
                rows.append(
                    {
                        "workers": n_workers,
                        "slides": counts["total"],
                        "succeeded": counts["succeeded"],
                        "wall_s": round(wall, 2),
                        "slides_per_hour": round(3600 * counts["succeeded"] / wall, 1),
                        "patches_per_s": round(patches / wall, 1),
                    }
                )
        finally:
            queue.stop()
            service.close()
    finally:
        redis_proc.kill()
        redis_proc.wait()
        shutil.rmtree(root, ignore_errors=True)
    base = rows[0]["slides_per_hour"] or 1.0
    for r in rows:
        r["scaling"] = round(r["slides_per_hour"] / base, 2)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slides", type=int, default=12)
    ap.add_argument("--bundle", default=None, help="model bundle (default: tiling only)")
    ap.add_argument("--database-url", default=None, help="PostgreSQL URL (default: SQLite in a temp dir)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = run(args.slides, args.bundle, args.database_url)
    print(f"{'workers':>7} {'slides':>6} {'ok':>4} {'wall_s':>8} {'slides/h':>10} {'patches/s':>10} {'scaling':>8}")
    for r in rows:
        print(
            f"{r['workers']:>7} {r['slides']:>6} {r['succeeded']:>4} {r['wall_s']:>8} {r['slides_per_hour']:>10} "
            f"{r['patches_per_s']:>10} {r['scaling']:>8}"
        )
    print(f"(cpu cores: {os.cpu_count()}; os.getloadavg: {tuple(round(x, 1) for x in os.getloadavg())})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
