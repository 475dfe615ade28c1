"""Launch the real `tritonserver` binary that the `nvidia-pytriton` wheel ships, as a child process.

That build has the Python backend only (no onnxruntime backend), so on a CPU machine a bundle is served
through its `cpu_python` model configs (`--model-config-name`), whose `model.py` runs the same ONNX with
onnxruntime. The environment recipe matters (see shared/reference/machine-notes.md §3b):
- the backend dir holds `libtriton_python.so`, `triton_python_backend_utils.py` and the stub built for
  *this* interpreter's X.Y;
- `LD_LIBRARY_PATH=<this python's libdir>:<site-packages>/nvidia_pytriton.libs`, else the stub binds the
  system libpython (wrong stdlib) or misses the bundled libcudart and the server hangs in "loading";
- `PATH=<venv>/bin:$PATH`, so the embedded stub finds the venv's site-packages (numpy, onnxruntime).
Start-up is bounded by a timeout (a missing library hangs rather than fails), ports are loopback and free,
stop is SIGTERM to the process group then SIGKILL, and the server's shared-memory regions (named with a
prefix unique to this launch) are removed afterwards.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from service.errors import BackendUnavailableError


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pytriton_dir() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailableError("the tritonserver binary comes with nvidia-pytriton, which is not installed")
    d = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    if not (d / "bin" / "tritonserver").exists():
        raise BackendUnavailableError(f"no tritonserver binary under {d}")
    return d


def server_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment the bundled server and its Python stub need (interpreter's libpython first)."""
    env = dict(os.environ if base is None else base)
    site = pytriton_dir().parent.parent
    libdirs = [sysconfig.get_config_var("LIBDIR") or "", str(site / "nvidia_pytriton.libs")]
    old = env.get("LD_LIBRARY_PATH")
    env["LD_LIBRARY_PATH"] = ":".join([d for d in libdirs if d] + ([old] if old else []))
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    return env


def build_backend_dir(dest: Path) -> Path:
    """`dest/python/` with the Python backend library, its utils and the stub for this interpreter."""
    pt = pytriton_dir()
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = pt / "python_backend_stubs" / ver / "triton_python_backend_stub"
    if not stub.exists():
        raise BackendUnavailableError(f"nvidia-pytriton ships no Python backend stub for Python {ver}")
    py = dest / "python"
    py.mkdir(parents=True, exist_ok=True)
    for src in (
        pt / "backends" / "python" / "libtriton_python.so",
        pt / "backends" / "python" / "triton_python_backend_utils.py",
        stub,
    ):
        shutil.copy2(src, py / src.name)
    return dest


class TritonServer:
    """A `tritonserver` child process on loopback ports. Use as a context manager or start()/stop().

    `model_config_name`: which `<model>/configs/<name>.pbtxt` to load ("cpu_python" for this CPU build;
    None for each model's default `config.pbtxt`).
    """

    def __init__(
        self,
        repository: str | Path,
        *,
        model_config_name: str | None = "cpu_python",
        workdir: str | Path | None = None,
        startup_timeout_s: float = 120.0,
        host: str = "127.0.0.1",
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        log_verbose: int = 0,
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.repository = Path(repository).resolve()
        self.model_config_name = model_config_name
        self.startup_timeout_s = startup_timeout_s
        self.host = host
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.log_verbose = log_verbose
        self.extra_args = tuple(extra_args)
        self._env = env
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="mstar-triton-"))
        self.shm_prefix = f"mstar_{os.getpid()}_{secrets.token_hex(4)}_"
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "tritonserver.log"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        pt = pytriton_dir()
        cmd = [
            str(pt / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            f"--backend-directory={self.workdir / 'backends'}",
            f"--cache-directory={pt / 'caches'}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            "--pinned-memory-pool-byte-size=0",
            "--strict-readiness=true",
            "--exit-on-error=true",
            "--exit-timeout-secs=10",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            f"--log-verbose={self.log_verbose}",
        ]
        if self.model_config_name:
            cmd.append(f"--model-config-name={self.model_config_name}")
        return cmd + list(self.extra_args)

    def start(self) -> TritonServer:
        if not self.repository.is_dir():
            raise BackendUnavailableError(f"Triton model repository {self.repository} does not exist")
        build_backend_dir(self.workdir / "backends")
        env = self._env if self._env is not None else server_env()
        log = open(self.log_path, "wb")  # noqa: SIM115 (the child writes it for its whole life)
        try:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                cwd=self.workdir,
            )
        finally:
            log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BackendUnavailableError(
                    f"tritonserver exited ({self.proc.returncode}) during start-up:\n{self.log_tail()}"
                )
            if self._ready():
                return
            time.sleep(0.2)
        raise BackendUnavailableError(
            f"tritonserver not ready after {self.startup_timeout_s:.0f} s (a missing library hangs model "
            f"loading):\n{self.log_tail()}"
        )

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as r:
            return r.read().decode()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM the server's process group (server + stubs), SIGKILL after `timeout_s`; remove our shm."""
        rc = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self._signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    self._signal(signal.SIGKILL)
                    self.proc.wait(10)
            self._signal(signal.SIGKILL)  # stubs left in the group, if any
            rc = self.proc.returncode
        for f in glob.glob(f"/dev/shm/{self.shm_prefix}*"):
            Path(f).unlink(missing_ok=True)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return rc

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
