"""Real external services for integration tests, started and stopped by the tests themselves.

PostgreSQL: `initdb` into a temporary directory and `pg_ctl` on a free loopback port, run as the `postgres`
OS user when we are root (the server refuses to run as root). Needs the Debian `postgresql` package
(`tests/sysdeps.sh`). Use from a conftest or test module:

    from services import postgres_url  # noqa: F401  (a session-scoped fixture)

`mstar serve` as a user runs it: `with mstar_serve(env, ["--workers", "1"]) as gw:` waits for `/readyz`, yields
`gw.url`, `gw.proc` and `gw.log`, and stops the process on exit (`gw.kill()` ends it on purpose mid-test).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
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


def fresh_database(postgres_url: str, name: str) -> str:
    """URL of an empty database `name` on the test server (dropped first if a run left it): a test's own jobs,
    invisible to every other test's runner and workers."""
    from sqlalchemy import create_engine, text

    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))
        conn.execute(text(f"CREATE DATABASE {name}"))
    admin.dispose()
    return postgres_url.rsplit("/", 1)[0] + f"/{name}"


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


FINAL_JOB_STATES = ("succeeded", "failed", "canceled")


def wait_job(client, job: str, timeout: float = 90.0, poll: float = 0.2) -> dict:
    """GET the job (`job`: its id, or the URL of a Location header) through an HTTP client until it reaches a
    final state and return it; fails with the last answer after `timeout` s."""
    url = job if "/" in job else f"/jobs/{job}"
    deadline = time.monotonic() + timeout
    while (answer := client.get(url).json())["state"] not in FINAL_JOB_STATES:
        assert time.monotonic() < deadline, f"job {job} did not finish: {answer}"
        time.sleep(poll)
    return answer


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


class ServedProcess:
    """A running `mstar serve` started by `mstar_serve`: its URL, the process, and its combined stdout/stderr log.

    `kill()` is how a test ends it on purpose (SIGKILL of the main process alone by default, as the OOM killer
    does): the helper then expects it dead on exit instead of reporting a crash."""

    def __init__(self, proc: subprocess.Popen, port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.killed = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, chars: int = 3000) -> str:
        return self.output()[-chars:]

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 10.0) -> None:
        """Signal the main process only (not its children) and wait for it to exit."""
        self.killed = True
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(timeout)


MSTAR = Path(sys.executable).with_name("mstar")


@contextlib.contextmanager
def mstar_serve(
    env: Mapping[str, str],
    args: Sequence[str] = (),
    *,
    port: int | None = None,
    log: Path | None = None,
    cwd: Path | None = None,
    ready: str = "/readyz",
    timeout: float = 90.0,
    stop_timeout: float = 30.0,
) -> Iterator[ServedProcess]:
    """`mstar serve --port PORT *args` as a real process with exactly `env`; yields it once `ready` answers 200.

    Output (stdout and stderr) goes to `log` (appended, so a restart on the same file keeps both runs; a temporary
    file when not given). Start-up fails at once, with the log's tail, if the process exits or `ready` does not
    answer 200 within `timeout` s. On exit: SIGTERM, then SIGKILL of its whole process group after
    `stop_timeout` s; a server that died without `kill()` fails the test with its log's tail."""
    import httpx

    port = port or free_port()
    tmp = None
    if log is None:
        tmp = Path(tempfile.mkdtemp(prefix="mstar-serve-"))
        log = tmp / "serve.log"
    with log.open("ab") as out:  # own session: a leftover child can be reaped by group, the test stays unsignalled
        proc = subprocess.Popen(
            [str(MSTAR), "serve", "--port", str(port), *args],
            env=dict(env),
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    served = ServedProcess(proc, port, log)
    try:
        deadline, last = time.monotonic() + timeout, "no answer"
        while True:
            try:
                r = httpx.get(served.url + ready, timeout=2.0)
                if r.status_code == 200:
                    break
                last = f"{r.status_code} {r.text[:500]}"
            except httpx.HTTPError as err:
                last = type(err).__name__
            if proc.poll() is not None:
                pytest.fail(f"mstar serve exited with {proc.returncode} during start-up:\n{served.tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"mstar serve: {ready} not ready within {timeout} s ({last}):\n{served.tail()}")
            time.sleep(0.1)
        try:
            yield served
        except BaseException as err:  # the test failed: say whether the server had died under it
            if proc.poll() is not None and not served.killed:
                err.add_note(f"mstar serve had died (exit {proc.returncode}):\n{served.tail()}")
            raise
        if proc.poll() is not None and not served.killed:
            pytest.fail(f"mstar serve died during the test (exit {proc.returncode}):\n{served.tail()}")
    finally:
        _stop(proc, stop_timeout)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def mstar_worker(
    env: Mapping[str, str],
    name: str,
    log: Path,
    args: Sequence[str] = (),
    *,
    timeout: float = 120.0,
    stop_timeout: float = 30.0,
) -> Iterator[subprocess.Popen]:
    """`mstar worker --name NAME@test *args` as a real process with exactly `env`; yields it once its output
    (appended to `log`) says `NAME@test ready`. Start-up fails at once, with the log's tail, if it exits first or
    is not ready within `timeout` s. On exit: SIGTERM, then SIGKILL of its whole process group (its pool
    children too) after `stop_timeout` s."""
    node = f"{name}@test"
    start = log.stat().st_size if log.exists() else 0  # a restart on the same log: only its own lines count
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [str(MSTAR), "worker", "--name", node, *args],
            env=dict(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout
        while f"{node} ready" not in log.read_bytes()[start:].decode(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-3000:]
                pytest.fail(f"mstar worker {node} did not start (exit {proc.poll()}):\n{tail}")
            time.sleep(0.2)
        yield proc
    finally:
        _stop(proc, stop_timeout)


def _stop(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM the main process (a graceful shutdown), SIGKILL its process group if it overstays, reap it."""
    if proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the group outlives a dead leader while any member remains
    proc.wait(10)


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


class OrthancServer:
    """A real Orthanc with its DICOMweb plugin on a free loopback port (storage in a temporary folder).

    `users` turns on HTTP basic auth; `lua` is the text of a Lua script Orthanc runs (e.g. the documented
    `OnStableSeries` trigger), `stable_age_s` how soon a series counts as stable. Needs the Debian packages
    orthanc and orthanc-dicomweb (`tests/sysdeps.sh`)."""

    PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"

    def __init__(
        self,
        root: Path,
        *,
        users: dict[str, str] | None = None,
        lua: str | None = None,
        stable_age_s: int = 60,
        env: dict[str, str] | None = None,
        port: int | None = None,
    ) -> None:
        import json

        binary = shutil.which("Orthanc")
        if binary is None or not Path(self.PLUGIN).exists():
            pytest.fail("Orthanc + DICOMweb plugin are not installed: run `bash tests/sysdeps.sh`")
        self.binary, self.root, self.port = binary, root, port or free_port()
        self.users = users or {}
        self.env = {**os.environ, **(env or {})}
        db = root / "db"
        db.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "mstar-test",
            "HttpPort": self.port,
            "DicomServerEnabled": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "StorageDirectory": str(db),
            "IndexDirectory": str(db),
            "Plugins": [self.PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "StableAge": stable_age_s,
            "HttpTimeout": 10,
        }
        if lua is not None:
            (root / "trigger.lua").write_text(lua)
            config["LuaScripts"] = [str(root / "trigger.lua")]
        (root / "orthanc.json").write_text(json.dumps(config))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def auth(self) -> tuple[str, str] | None:
        return next(iter(self.users.items())) if self.users else None

    def start(self, timeout: float = 30.0) -> None:
        import httpx

        log = (self.root / "orthanc.log").open("ab")
        self.proc = subprocess.Popen(
            [self.binary, str(self.root / "orthanc.json")], stdout=log, stderr=log, env=self.env
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(self.url + "/system", auth=self.auth, timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc did not start: {(self.root / 'orthanc.log').read_text()[-2000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, 9)
                self.proc.wait(10)
        self.proc = None

    def upload(self, files: list[Path]) -> None:
        """Store DICOM files through Orthanc's REST API (as a modality would send them)."""
        import httpx

        for f in files:
            r = httpx.post(self.url + "/instances", content=f.read_bytes(), auth=self.auth, timeout=30.0)
            r.raise_for_status()

    def count(self, what: str = "instances") -> int:
        import httpx

        return len(httpx.get(f"{self.url}/{what}", auth=self.auth, timeout=10.0).json())


@contextlib.contextmanager
def run_orthanc(**kwargs) -> Iterator[OrthancServer]:
    root = Path(tempfile.mkdtemp(prefix="mstar-orthanc-"))
    server = OrthancServer(root, **kwargs)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


#: the dicomizer's sample dataset, with patient data that must never surface in logs, job rows or errors
PHI = {
    "PatientName": "SOME^PATIENT",
    "PatientID": "C123456789",
    "PatientBirthDate": "19700101",
    "AccessionNumber": "A987654321",
}


def dicomize(
    svs: Path,
    out: Path,
    *,
    mpp: float = 0.499,
    image_type: str = "DERIVED\\PRIMARY\\VOLUME\\NONE",
    levels: int = 4,
    frame_of_reference: bool = True,
    study_uid: str | None = None,
) -> list[Path]:
    """Convert a real slide to a DICOM WSI series with Orthanc's OrthancWSIDicomizer (Debian orthanc-wsi).

    The tool's sample dataset is the base (with PHI-looking patient attributes); ImageType must name VOLUME
    (readers need it) and a FrameOfReferenceUID is added, which this dicomizer version does not write."""
    import json

    import openslide
    from pydicom.uid import generate_uid

    binary = shutil.which("OrthancWSIDicomizer")
    if binary is None:
        pytest.fail("OrthancWSIDicomizer is not installed: run `bash tests/sysdeps.sh` (orthanc-wsi)")
    out.mkdir(parents=True, exist_ok=True)
    sample = subprocess.run([binary, "--sample-dataset"], check=True, capture_output=True, text=True).stdout
    dataset = json.loads(sample)
    dataset.update(PHI)
    dataset["ImageType"] = image_type
    if frame_of_reference:
        dataset["FrameOfReferenceUID"] = str(generate_uid())
    if study_uid:
        dataset["StudyInstanceUID"] = study_uid
    (out / "dataset.json").write_text(json.dumps(dataset))
    with openslide.OpenSlide(str(svs)) as s:
        w, h = s.dimensions
    # orthanc-wsi 1.1 computes PixelSpacing as (imaged width / rows, imaged height / columns): passing the sizes
    # swapped makes the spacing, which readers use, come out right (ImagedVolumeWidth/Height end up swapped).
    subprocess.run(
        [
            binary,
            "--threads",
            "2",
            "--dataset",
            str(out / "dataset.json"),
            "--folder",
            str(out),
            "--imaged-width",
            f"{h * mpp / 1000:.6f}",
            "--imaged-height",
            f"{w * mpp / 1000:.6f}",
            "--pyramid",
            "1",
            "--levels",
            str(levels),
            str(svs),
        ],
        check=True,
        capture_output=True,
    )
    return sorted(out.glob("*.dcm"))
