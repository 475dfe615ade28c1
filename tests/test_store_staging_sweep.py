"""The start-time sweep of `.part` files on a store shared by several processes (gateway replicas, `mstar submit
--broker`): real writer processes, real files, a real gateway start.

Before, `ServiceContext.start` removed every `.part` file in the shared staging folder: starting (or restarting)
one of several gateways took another's in-flight upload, which then failed (404 `slide_not_found`). A writer now
holds an `flock` on its partial for the file's life and the sweep removes only the partials it can lock.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api import create_app
from service.config import Settings
from service.store.blobs import FileBlobStore

ROOT = Path(__file__).resolve().parents[1]

# A writer in its own process: `store.writer()`, 1 MB written, its partial's path printed, then (mode `closed`) the
# file closed as before the slide probe; it waits for a line on stdin, writes more (mode `writing`) and commits.
_WRITER = r"""
import sys
from pathlib import Path

kind, root, mode, key = sys.argv[1:5]
if kind == "file":
    from service.store.blobs import FileBlobStore
    store = FileBlobStore(Path(root))
else:
    from service.store.s3 import S3BlobStore
    store = S3BlobStore("s3://never-contacted", staging=Path(root) / "staging", cache_dir=Path(root) / "cache")
w = store.writer()
w.write(b"a" * 1_000_000)
if mode == "closed":
    w.close()
print(w.path, flush=True)
sys.stdin.readline()
if mode == "writing":
    w.write(b"b" * 1000)
if kind == "file":
    w.commit(key)
    print("committed", w.sha256, flush=True)
else:
    w.discard()
    print("discarded", flush=True)
"""

_SWEEP = r"""
import sys
import time
from pathlib import Path

kind, root = sys.argv[1:3]
if kind == "file":
    from service.store.blobs import FileBlobStore
    store = FileBlobStore(Path(root))
else:
    from service.store.s3 import S3BlobStore
    store = S3BlobStore("s3://never-contacted", staging=Path(root) / "staging", cache_dir=Path(root) / "cache")
deadline = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
n = store.sweep_partials()
while time.time() < deadline:
    n += store.sweep_partials()
print(n, flush=True)
"""


def _writer(kind: str, root: Path, mode: str, key: str = "slides/t/x.svs") -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, kind, str(root), mode, key],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline().strip()
    assert line, f"the writer process did not start (exit {proc.poll()})"
    return proc, Path(line)


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate("go\n", timeout=60)
    assert proc.returncode == 0, out
    return out


def _old_leftover(path: Path) -> Path:
    """A `.part` nobody holds (a crash of a version that took no locks), last written two hours ago."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"half a slide")
    past = time.time() - 7200
    os.utime(path, (past, past))
    return path


def test_a_gateway_start_keeps_live_writers_partials_and_removes_abandoned_ones(tmp_path: Path) -> None:
    """Another process's upload mid-body and another's slide being probed (closed, not yet committed) survive a
    gateway starting on the same store, and both commit afterwards; the partial of a writer killed mid-write and
    unlocked leftovers (in staging, and a copy cut short beside committed blobs) are removed by that start."""
    data = tmp_path / "data"
    root = data / "blobs"
    FileBlobStore(root)
    writing, writing_part = _writer("file", root, "writing", "slides/t/writing.svs")
    probing, probing_part = _writer("file", root, "closed", "slides/t/probing.svs")
    killed, killed_part = _writer("file", root, "writing")
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait(30)
        stale = _old_leftover(root / ".staging" / "leftover.part")
        cut_short = _old_leftover(root / "results" / "t" / "j" / "result.json.part")
        assert writing_part.parent == probing_part.parent == root / ".staging" and killed_part.is_file()

        settings = Settings(data_dir=data, pipeline="runner_pipelines:tiny", runner_workers=1, runner_poll_s=0.2)
        with TestClient(create_app(settings)) as client:  # the lifespan runs `ServiceContext.start`: the sweep
            assert client.get("/healthz").status_code == 200
            assert writing_part.is_file() and probing_part.is_file()
            assert not killed_part.exists() and not stale.exists() and not cut_short.exists()

            out_writing, out_probing = _finish(writing), _finish(probing)
    finally:
        for proc in (writing, probing, killed):
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=30)
    assert out_writing.startswith("committed") and out_probing.startswith("committed")
    store = FileBlobStore(root)
    with store.open("slides/t/writing.svs") as fh:
        assert fh.read() == b"a" * 1_000_000 + b"b" * 1000
    with store.open("slides/t/probing.svs") as fh:
        assert fh.read() == b"a" * 1_000_000
    assert not list(root.rglob("*.part"))  # a commit leaves no partial, locked or not


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_a_sweep_in_another_process_spares_this_processes_writers(tmp_path: Path, kind: str) -> None:
    """The S3 store stages on local disk the same way (`data_dir/s3/staging`, shared by the processes of a
    machine): its sweep is the base class's. A writer in this process survives a sweep run by another process,
    before and after its file is closed; once discarded or committed, nothing is left."""
    if kind == "s3":
        pytest.importorskip("boto3")
        from service.store.s3 import S3BlobStore

        store = S3BlobStore("s3://never-contacted", staging=tmp_path / "staging", cache_dir=tmp_path / "cache")
    else:
        store = FileBlobStore(tmp_path / "blobs")
    root = tmp_path if kind == "s3" else tmp_path / "blobs"

    def sweep() -> int:
        out = subprocess.run(
            [sys.executable, "-c", _SWEEP, kind, str(root)], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        return int(out.stdout)

    live = store.writer()
    live.write(b"x" * 4096)
    dead_proc, dead_part = _writer(kind, root, "writing")
    dead_proc.kill()
    dead_proc.communicate(timeout=30)
    stale = _old_leftover(store.staging / "leftover.part")
    assert sweep() == 2
    assert live.path.is_file() and not dead_part.exists() and not stale.exists()
    live.close()  # closed: probed next, still ours
    assert sweep() == 0 and live.path.is_file()
    if kind == "file":
        live.commit("slides/t/live.svs")
        with store.open("slides/t/live.svs") as fh:
            assert fh.read() == b"x" * 4096
    else:
        live.discard()
    assert not list(store.staging.rglob("*.part"))


def test_writers_racing_a_sweeping_replica_lose_nothing(tmp_path: Path) -> None:
    """Blobs written and committed (through staging, and copied in beside their destination) while another process
    sweeps the store over and over: every commit lands with its bytes. A sweep that locks a partial in the instant
    between its creation and its writer's lock removes it, and the writer starts again on a fresh file."""
    root = tmp_path / "blobs"
    store = FileBlobStore(root)
    src = tmp_path / "outside.bin"
    src.write_bytes(b"copied" * 1000)
    sweeper = subprocess.Popen(
        [sys.executable, "-c", _SWEEP, "file", str(root), str(time.time() + 60)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 4.0
        done: dict[str, int] = {}
        errors: list[BaseException] = []

        def write_many(tag: str) -> None:
            done[tag] = 0
            try:
                while time.monotonic() < deadline:
                    w = store.writer()
                    w.write(tag.encode() * 100)
                    w.commit(f"slides/{tag}/{done[tag]}.bin")
                    store.put_file(f"results/{tag}/{done[tag]}.bin", src)  # move=False: always the locked copy
                    done[tag] += 1
            except BaseException as err:
                errors.append(err)

        threads = [threading.Thread(target=write_many, args=(t,)) for t in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
    finally:
        sweeper.kill()
        sweeper.wait(30)
    committed = list(store.files())
    assert sum(done.values()) > 20 and len(committed) == 2 * sum(done.values())
    for p in committed:
        body = p.read_bytes()
        assert body in (b"a" * 100, b"b" * 100, b"copied" * 1000), p
    assert not list(root.rglob("*.part"))


def test_folders_a_dead_zip_ingest_unpacked_are_swept_once_stale(tmp_path: Path) -> None:
    """A DICOM ZIP is unpacked into `staging/series-*`; an ingest killed meanwhile left the folder for ever (no
    sweep looked at it). A sweep now removes such folders untouched for an hour, and never a fresh one."""
    store = FileBlobStore(tmp_path / "blobs")
    store.staging.mkdir(parents=True, exist_ok=True)
    old, fresh = store.staging / "series-dead", store.staging / "series-live"
    for folder in (old, fresh):
        (folder / "files").mkdir(parents=True)
        (folder / "files" / "level-0.dcm").write_bytes(b"\0" * 128)
    hour_ago = time.time() - 3700
    for p in (old, old / "files", old / "files" / "level-0.dcm"):
        os.utime(p, (hour_ago, hour_ago))
    assert store.sweep_partials() == 1
    assert not old.exists() and (fresh / "files" / "level-0.dcm").is_file()
