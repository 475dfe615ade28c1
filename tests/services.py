"""Real external services for integration tests, started and stopped by the tests themselves.

PostgreSQL: `initdb` into a temporary directory and `pg_ctl` on a free loopback port, run as the `postgres`
OS user when we are root (the server refuses to run as root). Needs the Debian `postgresql` package
(`tests/sysdeps.sh`). Use from a conftest or test module:

    from services import postgres_url  # noqa: F401  (a session-scoped fixture)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin() -> Path | None:
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))  # Debian keeps the server here
    if versions:
        return versions[-1].parent
    found = shutil.which("pg_ctl")
    return Path(found).parent if found else None


def _as_postgres(cmd: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


@contextlib.contextmanager
def run_postgres() -> Iterator[str]:
    """A throwaway PostgreSQL server; yields a SQLAlchemy URL (psycopg 3 driver)."""
    bindir = _pg_bin()
    if bindir is None:
        pytest.fail("PostgreSQL is not installed: run `bash tests/sysdeps.sh` (installs the postgresql package)")
    root = Path(tempfile.mkdtemp(prefix="mstar-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
    port = free_port()
    env = {**os.environ, "LC_ALL": "C"}
    subprocess.run(
        _as_postgres(
            [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"]
        ),
        check=True,
        capture_output=True,
        env=env,
    )
    opts = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    subprocess.run(
        _as_postgres(
            [str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "-t", "60", "start"]
        ),
        check=True,
        capture_output=True,
        env=env,
    )
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            _as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
            capture_output=True,
            env=env,
        )
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    with run_postgres() as url:
        yield url


def wait_http(url: str, timeout: float = 30.0) -> None:
    """Until `url` answers (any status); raises TimeoutError."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=2.0)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


@contextlib.contextmanager
def live_server(app, *, timeout: float = 60.0) -> Iterator[str]:
    """Serve an ASGI app with uvicorn on a free loopback port in a background thread; yields its base URL.

    The app's lifespan runs for real (store set-up, runner start and stop)."""
    import threading

    import uvicorn

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", access_log=False)
    )
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)


class RedisServer:
    """A `redis-server` child on a loopback port, with AOF (`appendfsync always`) so a restart keeps the queues.

    `kill()` is SIGKILL (a crash), `start()` brings it back on the same port and directory."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: run `bash tests/sysdeps.sh`")
        self.binary, self.root, self.port = binary, root, port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20.0) -> None:
        import redis

        self.root.mkdir(parents=True, exist_ok=True)
        cmd = [
            self.binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.root),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--maxmemory-policy",
            "noeviction",
            "--protected-mode",
            "yes",
        ]
        self.proc = subprocess.Popen(cmd, stdout=(self.root / "redis.log").open("ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        while True:
            try:
                if client.ping():
                    return
            except redis.exceptions.RedisError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {(self.root / 'redis.log').read_text()[-2000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, 9)
            self.proc.wait(10)
        self.proc = None


@contextlib.contextmanager
def run_redis() -> Iterator[RedisServer]:
    root = Path(tempfile.mkdtemp(prefix="mstar-redis-"))
    server = RedisServer(root)
    server.start()
    try:
        yield server
    finally:
        server.kill()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with run_redis() as server:
        yield server


@contextlib.contextmanager
def webhook_receiver(statuses: tuple[int, ...] = ()) -> Iterator[tuple[str, list[tuple[dict, bytes]]]]:
    """A real webhook receiver on loopback: yields (url, [(headers, body), ...]). The i-th POST is answered with
    `statuses[i]` (to exercise retries), every later one with 204."""
    import http.server
    import threading

    got: list[tuple[dict, bytes]] = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            got.append((dict(self.headers), self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(statuses[len(got) - 1] if len(got) <= len(statuses) else 204)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/hook", got
    finally:
        server.shutdown()
        server.server_close()
