"""Kill the gateway's main process alone mid-job, as the OOM killer would (`mstar serve` in its own process, the
embedded runner). Its workers must die with it, and after a restart the job runs again and ends succeeded with
every result file downloadable: nothing a finished attempt published may be lost."""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path

import httpx
import psutil
from services import free_port, mstar_serve
from worker_pipelines import make_slide

TESTS_DIR = Path(__file__).resolve().parent
KEY = "kill-test-key-0123456789abcdef"


def _env(root: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "MSTAR_DATA_DIR": str(root / "data"),
        "MSTAR_PIPELINE": "worker_pipelines:marked",
        "MSTAR_RUNNER_POLL_S": "0.1",
        "MSTAR_JOB_MAX_ATTEMPTS": "3",
        "MSTAR_API_KEYS": f'[{{"tenant": "lab", "key": "{KEY}"}}]',
        "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("MSTAR_BUNDLE_DIR", None)
    return env


def _wait(c: httpx.Client, job_id: str, pred, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(f"/jobs/{job_id}").json()
        if pred(job):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id}: {job}")


def test_killing_the_gateway_alone_keeps_the_finished_result(tmp_path: Path, cmu_svs: Path) -> None:
    port = free_port()
    slide = make_slide(cmu_svs, tmp_path / "slow.svs", "slow=4")
    env, serve_args, log = _env(tmp_path), ["--workers", "1"], tmp_path / "serve.log"
    with (
        mstar_serve(env, serve_args, port=port, log=log) as gateway,
        httpx.Client(base_url=gateway.url, headers={"X-API-Key": KEY}, timeout=60) as c,
    ):
        r = c.post("/slides", files={"file": ("s.svs", slide.read_bytes())})
        assert r.status_code == 202, r.text
        job_id = r.json()["job"]["id"]
        _wait(c, job_id, lambda j: j["state"] == "running" and j["progress"] > 0.05)
        workers = psutil.Process(gateway.pid).children(recursive=True)
        assert workers, "the embedded runner has worker processes"
        gateway.kill(signal.SIGKILL)  # the main process alone: its workers are not signalled
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"workers outlived their gateway: {[p.pid for p in alive]}"
    with (
        mstar_serve(env, serve_args, port=port, log=log) as gateway,
        httpx.Client(base_url=gateway.url, headers={"X-API-Key": KEY}, timeout=60) as c,
    ):
        job = _wait(c, job_id, lambda j: j["state"] in ("succeeded", "failed", "canceled"))
        assert job["state"] == "succeeded" and job["attempts"] == 2, job
        for path in ("result", "features"):  # a pipeline without a bundle writes no heatmap
            got = c.get(f"/jobs/{job_id}/{path}")
            assert got.status_code == 200, (path, got.text)
            assert hashlib.sha256(got.content).hexdigest() == got.headers["X-Content-SHA256"]
        time.sleep(2)  # an orphan (had one survived) would finish about now and race the new attempt
        assert c.get(f"/jobs/{job_id}").json()["state"] == "succeeded"
        assert c.get(f"/jobs/{job_id}/features").status_code == 200
        assert not list((tmp_path / "data" / "work").glob("job-*"))  # no scratch left by the killed attempt
