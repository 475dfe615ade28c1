"""Service overhead and status-endpoint latency, measured side by side in one run.

1. Time from upload to result through `mstar serve` (HTTP upload, job record, worker process, result fetch)
   vs `mstar analyze` on the same slide with the same bundle: the overhead ratio.
2. p50/p99 latency of `GET /jobs/{id}` under 50 concurrent clients (bounded loops, loopback only).

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


def time_service(c: httpx.Client, slide_bytes: bytes) -> tuple[float, str]:
    t = time.perf_counter()
    r = c.post("/slides", files={"file": ("slide", slide_bytes)})
    r.raise_for_status()
    job_url = r.headers["location"]
    while True:
        state = c.get(job_url).json()["state"]
        if state in ("succeeded", "failed", "canceled"):
            break
        time.sleep(0.02)
    if state != "succeeded":
        raise RuntimeError(f"job {job_url} {state}")
    c.get(f"{job_url}/result").raise_for_status()
    c.get(f"{job_url}/features").raise_for_status()
    return time.perf_counter() - t, job_url


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
                time_service(c, slide_bytes)  # warm-up: worker process start, model load, page cache
                time_cli(args.slide, args.bundle, Path(tmp) / "cli-warm")
                svc, cli = [], []
                for i in range(args.repeats):  # interleaved, so machine noise hits both sides alike
                    s, job_url = time_service(c, slide_bytes)
                    svc.append(s)
                    cli.append(time_cli(args.slide, args.bundle, Path(tmp) / f"cli-{i}"))
            lat = sorted(status_latency(url, job_url, args.clients, args.requests))
        finally:
            server.terminate()
            server.wait(30)

    p50 = lat[len(lat) // 2] * 1000
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000
    s_med, c_med = statistics.median(svc), statistics.median(cli)
    print(f"slide: {args.slide.name} ({len(slide_bytes) / 1e6:.1f} MB), bundle: {args.bundle}")
    print(f"upload->result via service: median {s_med:.2f} s  (runs: {', '.join(f'{x:.2f}' for x in svc)})")
    print(f"mstar analyze (CLI process): median {c_med:.2f} s  (runs: {', '.join(f'{x:.2f}' for x in cli)})")
    print(f"overhead ratio service/CLI: {s_med / c_med:.2f}")
    print(
        f"GET /jobs/{{id}} with {args.clients} concurrent clients x {args.requests}: "
        f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, {len(lat)} requests"
    )


if __name__ == "__main__":
    main()
