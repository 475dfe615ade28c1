"""`mstar keys create` and `mstar serve` as a user runs them: real processes, settings from MSTAR_* variables."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
from services import mstar_serve

MSTAR = str(Path(sys.executable).with_name("mstar"))


def test_keys_and_serve(tmp_path: Path, cmu_svs: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSTAR_")}
    env.update(MSTAR_DATA_DIR=str(tmp_path / "data"), MSTAR_LOG_LEVEL="warning")
    keys = [
        subprocess.run(
            [MSTAR, "keys", "create", "--tenant", t, *extra],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.strip()
        for t, extra in (("lab", []), ("ops", ["--admin"]))
    ]
    assert all(k.startswith("mstar_") for k in keys) and keys[0] != keys[1]
    bad = subprocess.run(
        [MSTAR, "keys", "create", "--tenant", " "], env=env, capture_output=True, text=True, timeout=60
    )
    assert bad.returncode != 0 and "tenant" in bad.stderr

    with mstar_serve(env, cwd=tmp_path, timeout=60, log=tmp_path / "serve.log") as server:
        url = server.url
        lab, ops = ({"Authorization": f"Bearer {k}"} for k in keys)
        assert httpx.get(f"{url}/readyz").json()["status"] == "ok"
        r = httpx.post(
            f"{url}/slides",
            headers=lab,
            files={"file": ("s.svs", cmu_svs.read_bytes())},
            data={"analyze": "false"},
            timeout=60,
        )
        assert r.status_code == 201 and r.json()["format"] == "svs"
        assert httpx.post(f"{url}/models/reload", headers=lab).status_code == 403
        assert httpx.post(f"{url}/models/reload", headers=ops).status_code == 200
        assert httpx.get(f"{url}/slides/{r.json()['id']}", headers=ops).status_code == 404  # other tenant
    assert "s.svs" not in server.output()  # the client's filename never reaches the log
    assert server.returncode in (0, -15)


def test_serve_refuses_an_oversized_request_head_and_keeps_serving(tmp_path: Path) -> None:
    """`mstar serve` bounds a request's head (h11, `MSTAR_MAX_HEADER_BYTES`): a 1 MiB header, sent before any
    authentication, is refused with 400 and its connection closed. Under httptools (uvicorn's default) nothing
    bounded it: an audit's four connections each sending a 64 MiB header grew the gateway by 250 MB. A head under
    the limit is served as before, and so is the next request."""
    import socket

    env = {k: v for k, v in os.environ.items() if not k.startswith("MSTAR_")}
    env.update(MSTAR_DATA_DIR=str(tmp_path / "data"), MSTAR_LOG_LEVEL="warning", MSTAR_MAX_HEADER_BYTES="65536")
    with mstar_serve(env, cwd=tmp_path, timeout=60, ready="/healthz") as server:
        assert httpx.get(f"{server.url}/healthz", headers={"X-Note": "x" * 32_000}).status_code == 200
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
            sent = 0
            try:
                while sent < 8 << 20:  # the server answers and closes long before this
                    sock.sendall(b"y" * 65536)
                    sent += 65536
            except OSError:
                pass
            answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 400") and sent < 8 << 20, (answer[:100], sent)
        assert httpx.get(f"{server.url}/healthz").status_code == 200
