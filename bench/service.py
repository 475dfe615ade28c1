"""Service overhead and status-endpoint latency, measured side by side in one run.

1. Per-job overhead: time from `POST /slides/{id}/analyses` (fresh run) to the downloaded result through
   `mstar serve`, minus the pipeline's own time for that job (`result.json` timings), as a share of the pipeline
   time; and the same job through `mstar analyze` in its own process, for reference.
2. p50/p99 latency of `GET /jobs/{id}` under 50 concurrent clients against `GET /healthz` under the same load in
   the same run (healthz, jobs, healthz again; bounded loops, loopback only): the p99 ratio.
3. 20 concurrent uploads of the same slide: how many analyses actually ran (identical work is reused).

    python bench/service.py [--slide PATH] [--bundle DIR] [--repeats 3] [--clients 50] [--requests 40]

Without `--bundle` both sides use the demo bundle, as `mstar analyze` does (built on first use).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
# run as a script, this file's folder comes first on sys.path and its name would shadow the `service` package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))
MSTAR = str(Path(sys.executable).with_name("mstar"))
KEY = "bench-key-0123456789abcdef0123"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_cli(slide: Path, bundle: Path, out: Path) -> float:
    t = time.perf_counter()
    subprocess.run(
        [MSTAR, "analyze", str(slide), "--bundle", str(bundle), "--out", str(out)], check=True, capture_output=True
    )
    return time.perf_counter() - t


def time_service(c: httpx.Client, slide_id: str) -> tuple[float, float, str]:
    """(seconds from submit to downloaded result, the pipeline's own seconds, job URL) for a fresh run."""
    t = time.perf_counter()
    r = c.post(f"/slides/{slide_id}/analyses", json={"fresh": True})
    r.raise_for_status()
    job_url = r.headers["location"]
    while True:
        state = c.get(job_url).json()["state"]
        if state in ("succeeded", "failed", "canceled"):
            break
        time.sleep(0.02)
    if state != "succeeded":
        raise RuntimeError(f"job {job_url} {state}")
    result = c.get(f"{job_url}/result")
    result.raise_for_status()
    c.get(f"{job_url}/features").raise_for_status()
    return time.perf_counter() - t, float(result.json()["timings"]["total_s"]), job_url


def concurrent_uploads(url: str, slide_bytes: bytes, n: int) -> tuple[int, int]:
    """(jobs, analyses that ran) for `n` simultaneous uploads of the same bytes, once all finished."""
    barrier = threading.Barrier(n)
    jobs: list[str] = []
    lock = threading.Lock()

    def upload() -> None:
        with httpx.Client(base_url=url, headers={"X-API-Key": KEY}, timeout=300) as c:
            barrier.wait()
            r = c.post("/slides", files={"file": ("same", slide_bytes)})
            if r.status_code != 202:
                raise RuntimeError(f"upload answered {r.status_code}: {r.text}")
            with lock:
                jobs.append(r.json()["job"]["id"])

    threads = [threading.Thread(target=upload) for _ in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    ran = 0
    with httpx.Client(base_url=url, headers={"X-API-Key": KEY}, timeout=60) as c:
        for job_id in jobs:
            while (job := c.get(f"/jobs/{job_id}").json())["state"] not in ("succeeded", "failed", "canceled"):
                time.sleep(0.05)
            ran += job["attempts"] > 0 and "reused_from" not in job["options"]
    return len(jobs), ran


def status_latency(url: str, job_url: str, clients: int, requests: int) -> list[float]:
    lat: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client() -> None:
        mine = []
        with httpx.Client(base_url=url, headers={"X-API-Key": KEY}, timeout=30) as c:
            c.get(job_url)  # connect outside the timed loop
            barrier.wait()
            for _ in range(requests):
                t = time.perf_counter()
                c.get(job_url).raise_for_status()
                mine.append(time.perf_counter() - t)
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return lat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slide", type=Path, default=ROOT.parent / "shared/data/slides/CMU-1-Small-Region.svs")
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--requests", type=int, default=40, help="GET /jobs/{id} per client")
    ap.add_argument("--uploads", type=int, default=20, help="concurrent uploads of the same slide")
    args = ap.parse_args()
    if args.bundle is None:
        from service.cli.analyze import default_bundle_dir, ensure_demo_bundle

        args.bundle = ensure_demo_bundle(default_bundle_dir())
    slide_bytes = args.slide.read_bytes()

    with tempfile.TemporaryDirectory(prefix="mstar-bench-") as tmp:
        port = _free_port()
        env = {
            **os.environ,
            "MSTAR_DATA_DIR": f"{tmp}/data",
            "MSTAR_BUNDLE_DIR": str(args.bundle),
            "MSTAR_API_KEYS": f'[{{"tenant": "bench", "key": "{KEY}"}}]',
            "MSTAR_RUNNER_POLL_S": "0.05",
            "MSTAR_TENANT_MAX_UPLOADS": str(max(4, args.uploads)),  # the identical-uploads case sends them at once
            "MSTAR_LOG_LEVEL": "warning",
        }
        server = subprocess.Popen([MSTAR, "serve", "--port", str(port)], env=env, cwd=tmp)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("mstar serve did not become ready")
                time.sleep(0.2)
            with httpx.Client(base_url=url, headers={"X-API-Key": KEY}, timeout=300) as c:
                up = c.post("/slides", files={"file": ("slide", slide_bytes)}, data={"analyze": "false"})
                up.raise_for_status()
                slide_id = up.json()["id"]
                time_service(c, slide_id)  # warm-up: worker process start, model load, page cache
                time_cli(args.slide, args.bundle, Path(tmp) / "cli-warm")
                svc, pipe, cli = [], [], []
                for i in range(args.repeats):  # interleaved, so machine noise hits both sides alike
                    s, p, job_url = time_service(c, slide_id)
                    svc.append(s)
                    pipe.append(p)
                    cli.append(time_cli(args.slide, args.bundle, Path(tmp) / f"cli-{i}"))
            health_a = status_latency(url, "/healthz", args.clients, args.requests)
            jobs_lat = sorted(status_latency(url, job_url, args.clients, args.requests))
            health_b = status_latency(url, "/healthz", args.clients, args.requests)
            health = sorted(health_a + health_b)
            n_up, ran = concurrent_uploads(url, args.slide.read_bytes() + b"\0" * 7, args.uploads)
        finally:
            server.terminate()
            server.wait(30)

    def pct(lat: list[float], q: float) -> float:
        return lat[min(len(lat) - 1, int(len(lat) * q))] * 1000

    overhead = [(s - p) / p for s, p in zip(svc, pipe, strict=True)]
    s_med, c_med = statistics.median(svc), statistics.median(cli)
    print(f"slide: {args.slide.name} ({len(slide_bytes) / 1e6:.1f} MB), bundle: {args.bundle}")
    print(f"submit->result via service: median {s_med:.2f} s  (runs: {', '.join(f'{x:.2f}' for x in svc)})")
    print(f"pipeline time inside those jobs: median {statistics.median(pipe):.2f} s")
    print(f"per-job overhead (service - pipeline) / pipeline: median {statistics.median(overhead) * 100:.1f} %")
    print(f"mstar analyze (its own process, model load included): median {c_med:.2f} s")
    print(
        f"GET /jobs/{{id}} with {args.clients} concurrent clients x {args.requests}: "
        f"p50 {pct(jobs_lat, 0.5):.1f} ms, p99 {pct(jobs_lat, 0.99):.1f} ms, {len(jobs_lat)} requests"
    )
    print(f"GET /healthz, same load, before and after: p50 {pct(health, 0.5):.1f} ms, p99 {pct(health, 0.99):.1f} ms")
    print(f"p99 ratio jobs/healthz: {pct(jobs_lat, 0.99) / pct(health, 0.99):.2f}")
    print(f"{n_up} concurrent uploads of the same slide: {ran} analysis ran, the rest reused its result")


if __name__ == "__main__":
    main()
