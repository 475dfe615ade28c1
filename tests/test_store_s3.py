"""`S3BlobStore` against a real S3-compatible server: moto's server mode in its own process, over real HTTP.

What is pinned: a round trip including a multipart-size object and the staged writer; the worker-side cache
(a slide is fetched once, reused, re-fetched when the object changes, never served from a partial download,
one download for concurrent callers, least-recently-used eviction that spares copies in use); `delete_prefix`
paging and its prefix boundary; clear refusals (missing bucket, rejected or absent credentials, unreachable
endpoint) from the store, `mstar worker` and `/readyz`; `s3://` batch sources and `POST /slides` sources;
and one job end to end through a real `mstar worker` process (Redis, PostgreSQL) whose only link to the gateway
is the bucket.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import pytest
from services import (  # noqa: F401
    free_port,
    fresh_database,
    live_server,
    mstar_worker,
    postgres_url,
    redis_server,
    wait_http,
    wait_job,
)

from service.config import Settings
from service.store.blobs import BlobStoreError, FileBlobStore, make_blob_store
from service.store.s3 import S3BlobStore

MIB = 1024**2
MSTAR = Path(sys.executable).with_name("mstar")
CREDS = {"AWS_ACCESS_KEY_ID": "mstar-test", "AWS_SECRET_ACCESS_KEY": "mstar-test-secret"}


class MotoServer:
    """`python -m moto.server` on a free loopback port (a separate process, real HTTP)."""

    def __init__(self, root: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (root / f"moto-{self.port}.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        try:
            wait_http(f"{self.url}/moto-api/", timeout=60)
        except TimeoutError:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def moto(tmp_path_factory) -> Iterator[MotoServer]:
    mp = pytest.MonkeyPatch()
    for k, v in {**CREDS, "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        mp.setenv(k, v)
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    try:
        yield server
    finally:
        server.stop()
        mp.undo()


def _bucket(moto: MotoServer, name: str) -> str:
    client = boto3.client("s3", endpoint_url=moto.url)
    client.create_bucket(Bucket=name)
    return name


_N = iter(range(10**6))


@pytest.fixture()
def bucket(moto: MotoServer) -> str:
    return _bucket(moto, f"mstar-{next(_N)}")


def _store(moto: MotoServer, bucket: str, root: Path, **kw) -> S3BlobStore:
    kw.setdefault("part_size", 5 * MIB)  # the S3 minimum part size: multipart kicks in at 5 MiB
    return S3BlobStore(
        f"s3://{bucket}/pre/fix", staging=root / "staging", cache_dir=root / "cache", endpoint_url=moto.url, **kw
    )


def _count(store: S3BlobStore, op: str) -> list[int]:
    """Count real requests of one kind through botocore's event system (the client sends them all)."""
    n = [0]

    def hook(**_kw) -> None:
        n[0] += 1

    store.client.meta.events.register(f"before-call.s3.{op}", hook)
    return n


def _file(path: Path, size: int, seed: int = 0) -> Path:
    block = hashlib.sha256(str(seed).encode()).digest() * (MIB // 32)
    path.write_bytes((block * (size // len(block) + 1))[:size])
    return path


# --- settings ---------------------------------------------------------------------------------------------


def test_settings_select_the_store(tmp_path: Path) -> None:
    assert isinstance(make_blob_store(Settings(data_dir=tmp_path)), FileBlobStore)
    s = Settings(data_dir=tmp_path, blob_url="s3://my-bucket/mstar/prod", s3_endpoint_url="http://minio:9000")
    store = make_blob_store(s)
    assert isinstance(store, S3BlobStore) and (store.bucket, store.prefix) == ("my-bucket", "mstar/prod")
    assert store.staging.is_relative_to(tmp_path) and store.cache_dir == tmp_path / "s3-cache"
    for bad in ("ftp://bucket", "s3://", "s3://UPPER", "/mnt/blobs"):
        with pytest.raises(ValueError, match="MSTAR_BLOB_URL"):
            Settings(data_dir=tmp_path, blob_url=bad)
    with pytest.raises(ValueError, match="MSTAR_S3_ENDPOINT_URL"):
        Settings(data_dir=tmp_path, s3_endpoint_url="minio:9000")


# --- the store ----------------------------------------------------------------------------------------------


def test_round_trip_multipart_writer_and_delete(moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    store = _store(moto, bucket, tmp_path)
    store.check()
    src = _file(tmp_path / "big.bin", 11 * MIB + 123)
    store.put_file("slides/t1/a.svs", src)
    head = store.client.head_object(Bucket=bucket, Key="pre/fix/slides/t1/a.svs")
    assert head["ETag"].strip('"').endswith("-3")  # three parts: boto3's managed multipart upload
    assert store.exists("slides/t1/a.svs") and store.size("slides/t1/a.svs") == src.stat().st_size
    assert not store.exists("slides/t1/b.svs")
    with store.open("slides/t1/a.svs") as fh:
        assert hashlib.sha256(fh.read()).digest() == hashlib.sha256(src.read_bytes()).digest()

    w = store.writer()  # the gateway's upload path: staged locally, hashed, uploaded on commit
    w.write(b"slide bytes")
    assert w.path.parent == store.staging
    w.commit("slides/t1/w.bin")
    assert not w.path.exists() and store.open("slides/t1/w.bin").read() == b"slide bytes"
    moved = _file(tmp_path / "moved.bin", 1000)
    store.put_file("results/t1/j/features.h5", moved, move=True)
    assert not moved.exists()

    store.delete("slides/t1/w.bin")
    store.delete("slides/t1/w.bin")  # idempotent
    assert not store.exists("slides/t1/w.bin")
    with pytest.raises(FileNotFoundError):
        store.open("slides/t1/w.bin")
    with pytest.raises(FileNotFoundError):
        store.local_path("slides/t1/w.bin")
    with pytest.raises(ValueError, match="invalid blob key"):
        store.exists("../escape")


def test_delete_prefix_pages_and_stops_at_the_boundary(moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    store = _store(moto, bucket, tmp_path, page_size=2)
    one = _file(tmp_path / "one", 10)
    for i in range(7):
        store.put_file(f"results/t/j1/f{i}", one)
    store.put_file("results/t/j1/sub/deep", one)
    store.put_file("results/t/j10/keep", one)  # shares the string prefix "results/t/j1", not the folder
    lists, deletes = _count(store, "ListObjectsV2"), _count(store, "DeleteObjects")
    store.delete_prefix("results/t/j1")
    assert lists[0] >= 4 and deletes[0] >= 4  # 8 keys at 2 a page
    keys = [o["Key"] for o in store.client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert keys == ["pre/fix/results/t/j10/keep"]
    store.delete_prefix("results/t/nothing")  # no error on an empty prefix


def test_list_prefix_and_the_rna_channel_on_s3(moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    """`list_prefix` pages, strips the store's own prefix and stops at the folder boundary; the RNA channel
    (put, digest-checked read, discard) works on the object store as on files."""
    from service.jobs import rna_channel

    store = _store(moto, bucket, tmp_path, page_size=2)
    one = _file(tmp_path / "one", 10)
    for i in range(5):
        store.put_file(f"ephemeral/rna/j{i}", one)
    store.put_file("ephemeral/rnax/other", one)
    listed = list(store.list_prefix("ephemeral/rna"))
    assert [k for k, _ in listed] == [f"ephemeral/rna/j{i}" for i in range(5)]
    assert all(abs(t - time.time()) < 600 for _, t in listed)
    data = b"Gene,Value\nTP53,1.0\n"
    rna_channel.put(store, "job9", data)
    assert rna_channel.read(store, "job9", rna_channel.digest(data)) == data
    rna_channel.discard(store, ["job9"])
    with pytest.raises(rna_channel.RnaProfileGoneError):
        rna_channel.read(store, "job9", rna_channel.digest(data))


def test_local_copy_is_fetched_once_and_follows_changes(moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    store = _store(moto, bucket, tmp_path)
    store.put_file("slides/t/x.ome.tif", _file(tmp_path / "v1", 6 * MIB, seed=1))
    gets = _count(store, "GetObject")
    with store.local_copy("slides/t/x.ome.tif") as p1:
        assert p1.name == "x.ome.tif" and p1.is_relative_to(store.cache_dir)  # the extension is kept
        assert p1.read_bytes() == (tmp_path / "v1").read_bytes()
    fetched = gets[0]
    assert fetched >= 1
    p2 = store.local_path("slides/t/x.ome.tif")
    assert p2 == p1 and p2.stat().st_ino == p1.stat().st_ino and gets[0] == fetched  # reused, not fetched

    # A copy that never completed (a crash: only a .part file, no data file) is never used.
    p2.unlink()
    (p2.parent / ".dead.part").write_bytes(b"half")
    p3 = store.local_path("slides/t/x.ome.tif")
    assert p3.read_bytes() == (tmp_path / "v1").read_bytes() and gets[0] > fetched
    assert not list(p3.parent.glob("*.part"))

    # The object changes (same key): the cache entry is keyed by ETag, so the new bytes are served.
    store.put_file("slides/t/x.ome.tif", _file(tmp_path / "v2", 6 * MIB, seed=2))
    p4 = store.local_path("slides/t/x.ome.tif")
    assert p4 != p3 and p4.read_bytes() == (tmp_path / "v2").read_bytes()


def test_folder_key_is_copied_whole(moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    """A DICOM series is stored as a blob folder (`<key>/0000.dcm`, ...): its local copy is the folder."""
    store = _store(moto, bucket, tmp_path)
    parts = [_file(tmp_path / f"i{i}", 300_000 + i, seed=10 + i) for i in range(3)]
    for i, part in enumerate(parts):
        store.put_file(f"slides/t/s1.dcmdir/{i:04d}.dcm", part)
    gets = _count(store, "GetObject")
    with store.local_copy("slides/t/s1.dcmdir") as folder:
        assert folder.is_dir() and folder.name == "s1.dcmdir"
        assert sorted(p.name for p in folder.iterdir()) == ["0000.dcm", "0001.dcm", "0002.dcm"]
        assert all((folder / f"{i:04d}.dcm").read_bytes() == p.read_bytes() for i, p in enumerate(parts))
    n = gets[0]
    assert store.local_path("slides/t/s1.dcmdir") == folder and gets[0] == n  # reused
    assert not list(folder.parent.glob(".*.part"))
    store.delete("slides/t/s1.dcmdir")  # as FileBlobStore.delete: the folder goes whole
    assert not store.client.list_objects_v2(Bucket=bucket, Prefix="pre/fix/slides/t/s1").get("Contents")
    with pytest.raises(FileNotFoundError):
        store.local_path("slides/t/s1.dcmdir")


def test_concurrent_fetches_download_once(moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    src = _file(tmp_path / "s", 4 * MIB, seed=3)
    _store(moto, bucket, tmp_path).put_file("slides/t/c.svs", src)
    # Separate store objects (own clients, own lock file handles), one shared cache: as worker processes are.
    stores = [_store(moto, bucket, tmp_path) for _ in range(6)]
    counters = [_count(s, "GetObject") for s in stores]
    start = threading.Barrier(len(stores))
    paths: list[Path] = []
    errors: list[BaseException] = []

    def run(s: S3BlobStore) -> None:
        try:
            start.wait()
            with s.local_copy("slides/t/c.svs") as p:
                assert p.read_bytes() == src.read_bytes()
                paths.append(p)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=run, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(set(paths)) == 1 and len(paths) == len(stores)
    assert sum(c[0] for c in counters) == 1  # one GET: one thread downloaded, the others waited and reused


def test_object_replaced_during_download_is_not_mixed(moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    store = _store(moto, bucket, tmp_path)
    store.put_file("slides/t/r.svs", _file(tmp_path / "old", 2 * MIB, seed=4))
    new = _file(tmp_path / "new", 2 * MIB, seed=5)
    other = _store(moto, bucket, tmp_path / "other")
    fired = []

    def replace(**_kw) -> None:  # another writer replaces the object between our HEAD and our GET
        if not fired:
            fired.append(1)
            other.put_file("slides/t/r.svs", new)

    store.client.meta.events.register("before-call.s3.GetObject", replace)
    path = store.local_path("slides/t/r.svs")
    assert fired and path.read_bytes() == new.read_bytes()
    entries = [p for p in store.cache_dir.iterdir() if any(f.name == "r.svs" for f in p.iterdir())]
    assert len(entries) == 1  # nothing stored under the old ETag


def test_cache_bound_evicts_least_recent_not_in_use(moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    store = _store(moto, bucket, tmp_path, cache_max_bytes=int(2.5 * MIB))
    for name in "abcde":
        store.put_file(f"slides/t/{name}.svs", _file(tmp_path / name, MIB, seed=ord(name)))
    with store.local_copy("slides/t/a.svs") as a:
        b = store.local_path("slides/t/b.svs")
        time.sleep(0.01)
        c = store.local_path("slides/t/c.svs")  # 3 MiB > 2.5: b goes (a, older, is in use)
        assert a.exists() and not b.exists() and c.exists()
        time.sleep(0.01)
        d = store.local_path("slides/t/d.svs")
        assert a.exists() and not c.exists() and d.exists()
        assert a.read_bytes() == (tmp_path / "a").read_bytes()
    e = store.local_path("slides/t/e.svs")  # a is free now and the least recently used
    assert not a.exists() and d.exists() and e.exists()
    assert sorted(p.name for p in store.cache_dir.iterdir()) == sorted([d.parent.name, e.parent.name])  # no husks
    store.clear_cache()
    assert list(store.cache_dir.iterdir()) == []
    assert store.local_path("slides/t/a.svs").read_bytes() == (tmp_path / "a").read_bytes()  # fetched anew


def test_fetch_restarts_when_its_entry_is_evicted_under_it(moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    """A fetcher that opened `.pin` just before an evictor removed the entry must not use the unlinked lock: it
    notices and starts again on a fresh entry (the copy it returns is complete and pinned)."""
    from service.store import s3

    store = _store(moto, bucket, tmp_path)
    store.put_file("slides/t/a.svs", _file(tmp_path / "a", MIB, seed=1))
    first = store.local_path("slides/t/a.svs")
    entry = first.parent
    real_flock, raced = s3.fcntl.flock, []

    def flock(fh, op):  # the evictor wins the race between this fetcher's open and its lock
        if op == s3.fcntl.LOCK_SH and not raced:
            raced.append(1)
            store.clear_cache()
        return real_flock(fh, op)

    s3.fcntl.flock = flock
    try:
        with store.local_copy("slides/t/a.svs") as again:
            assert raced and again.read_bytes() == (tmp_path / "a").read_bytes()
            pin = again.parent / ".pin"
            assert pin.exists()
            store.clear_cache()  # pinned: not evicted
            assert again.exists()
    finally:
        s3.fcntl.flock = real_flock
    assert entry.name == again.parent.name  # same key, ETag and size: the same entry name, made anew


# --- refusals -----------------------------------------------------------------------------------------------


def test_refusals_say_what_is_wrong(moto: MotoServer, tmp_path: Path) -> None:
    with pytest.raises(BlobStoreError, match=r"bucket 'no-such-bucket' at 127\.0\.0\.1:\d+ does not exist"):
        _store(moto, "no-such-bucket", tmp_path).check()
    with pytest.raises(
        BlobStoreError, match=r"uploading pre/fix/slides/x\.svs: bucket 'no-such-bucket' .*does not exist"
    ):
        _store(moto, "no-such-bucket", tmp_path).put_file("slides/x.svs", _file(tmp_path / "x", 10))

    dead = S3BlobStore(
        "s3://b1", staging=tmp_path / "s", cache_dir=tmp_path / "c", endpoint_url=f"http://127.0.0.1:{free_port()}"
    )
    with pytest.raises(BlobStoreError, match="cannot reach the object store") as err:
        dead.check()
    assert err.value.code == "store_unavailable" and err.value.http_status == 503

    with pytest.MonkeyPatch.context() as mp:  # no credentials anywhere in the AWS chain
        for k in CREDS:
            mp.delenv(k)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        mp.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
        with pytest.raises(BlobStoreError, match="no S3 credentials found"):
            _store(moto, "b1", tmp_path).check()

    strict = MotoServer(tmp_path, env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"})  # checks access keys: ours is unknown
    try:
        s = S3BlobStore("s3://b1", staging=tmp_path / "s", cache_dir=tmp_path / "c", endpoint_url=strict.url)
        with pytest.raises(BlobStoreError, match=r"refused access .*\(InvalidAccessKeyId\)") as err:
            s.check()
        assert CREDS["AWS_SECRET_ACCESS_KEY"] not in str(err.value) and CREDS["AWS_ACCESS_KEY_ID"] not in str(err.value)
    finally:
        strict.stop()


def test_worker_and_readyz_refuse_a_missing_bucket(moto: MotoServer, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "MSTAR_DATA_DIR": str(tmp_path / "w"),
        "MSTAR_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0",
        "MSTAR_BLOB_URL": "s3://missing-bucket/x",
        "MSTAR_S3_ENDPOINT_URL": moto.url,
    }
    run = subprocess.run([str(MSTAR), "worker"], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "error [store_unavailable]: checking the blob store: bucket 'missing-bucket'" in run.stderr
    assert "does not exist" in run.stderr and "Traceback" not in run.stderr

    from service.api import create_app

    settings = Settings(data_dir=tmp_path / "g", blob_url="s3://missing-bucket/x", s3_endpoint_url=moto.url)
    with live_server(create_app(settings)) as url:
        r = httpx.get(f"{url}/readyz", timeout=60)
        assert r.status_code == 503
        assert "bucket 'missing-bucket'" in r.json()["checks"]["store"]["detail"]
        _bucket(moto, "missing-bucket")
        assert httpx.get(f"{url}/readyz", timeout=60).json()["checks"]["store"] == {"ok": True}


# --- batch manifests ----------------------------------------------------------------------------------------


def test_batch_s3_sources_are_copied_into_the_store(moto: MotoServer, bucket: str, tmp_path: Path, cmu_svs: Path):
    from service.batch import BatchService

    src_bucket = _bucket(moto, f"{bucket}-src")
    boto3.client("s3", endpoint_url=moto.url).upload_file(str(cmu_svs), src_bucket, "cohort/cmu.svs")
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"slide,id\ns3://{src_bucket}/cohort/cmu.svs,a\ns3://{src_bucket}/cohort/gone.svs,b\n")

    s3 = Settings(data_dir=tmp_path / "s3", blob_url=f"s3://{bucket}/pre", s3_endpoint_url=moto.url)
    svc = BatchService(s3)
    try:
        rep = svc.submit(manifest, tenant="lab")
        assert len(rep.queued) == 1 and rep.failed_ingest == 1
        st = svc.status(rep.batch_id)
        assert st.items[1].error_code == "slide_not_found" and "gone.svs does not exist" in st.items[1].reason
        keys = [o["Key"] for o in svc.blobs.client.list_objects_v2(Bucket=bucket)["Contents"]]
        assert len(keys) == 1 and keys[0].startswith("pre/slides/") and keys[0].endswith(".svs")
        with svc.blobs.open(keys[0].removeprefix("pre/")) as fh:
            assert hashlib.sha256(fh.read()).hexdigest() == hashlib.sha256(cmu_svs.read_bytes()).hexdigest()
        assert svc.submit(manifest, tenant="lab").in_flight == 1  # resubmission: the copy is not repeated
    finally:
        svc.close()

    files = BatchService(Settings(data_dir=tmp_path / "fs"))
    try:
        rep = files.submit(manifest, tenant="lab")
        assert rep.failed_ingest == 2 and not rep.queued
        reason = files.status(rep.batch_id).items[0].reason
        assert "s3:// sources need the S3 blob store (MSTAR_BLOB_URL=s3://" in reason
    finally:
        files.close()


def test_upload_source_copies_an_s3_object_like_an_upload(
    moto: MotoServer, bucket: str, tmp_path: Path, cmu_svs: Path
) -> None:
    """`POST /slides` with `source=s3://...` instead of `file`: copied by the batch ingest's code path, then
    deduplicated, probed and stored like an upload; `mstar submit --server` sends s3:// lines that way."""
    from service.api import create_app
    from service.batch_http import HttpBatch

    src = _bucket(moto, f"{bucket}-src")
    s3c = boto3.client("s3", endpoint_url=moto.url)
    s3c.upload_file(str(cmu_svs), src, "cohort/cmu.svs")
    cap = cmu_svs.stat().st_size + 1000
    s3c.put_object(Bucket=src, Key="cohort/big.svs", Body=b"\0" * (cap + 1))
    s3c.put_object(Bucket=src, Key="cohort/notes.txt", Body=b"not a slide at all\n" * 100)
    key = "s3-source-key-0123456789abcdef"
    common = {"pipeline": "runner_pipelines:tiny", "runner_poll_s": 0.1, "upload_max_bytes": cap}
    common["api_keys"] = [{"tenant": "lab", "key": key}]
    # the store's own bucket is listed too: its prefix must still be refused (another tenant's slides live there)
    common["s3_source_buckets"] = [src, bucket]
    settings = Settings(data_dir=tmp_path / "g", blob_url=f"s3://{bucket}/pre", s3_endpoint_url=moto.url, **common)
    auth = {"Authorization": f"Bearer {key}"}

    def post(c: httpx.Client, **fields) -> httpx.Response:
        return c.post("/slides", files={k: (None, v) for k, v in fields.items()})

    with live_server(create_app(settings)) as url, httpx.Client(base_url=url, headers=auth, timeout=60) as c:
        r = post(c, source=f"s3://{src}/cohort/cmu.svs")
        assert r.status_code == 202, r.text
        slide, job = r.json()["slide"], r.json()["job"]
        assert slide["format"] == "svs" and slide["size_bytes"] == cmu_svs.stat().st_size
        assert r.headers["location"] == f"/jobs/{job['id']}"
        deadline = time.monotonic() + 60
        while (state := c.get(f"/jobs/{job['id']}").json()["state"]) in ("queued", "running"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert state == "succeeded"
        again = post(c, source=f"s3://{src}/cohort/cmu.svs", analyze="false")
        assert again.status_code == 200 and again.json()["id"] == slide["id"]  # deduplicated by content

        refusals = [
            ({"source": f"s3://{src}/cohort/gone.svs"}, 404, "slide_not_found", "gone.svs does not exist"),
            ({"source": f"s3://{src}/cohort/big.svs"}, 413, "slide_too_large", "exceeds the upload limit"),
            ({"source": f"s3://{src}/cohort/notes.txt"}, 415, "unsupported_format", ""),
            ({"source": f"https://example.org/{src}/x.svs"}, 422, "invalid_parameter", "s3://bucket/key"),
            ({"source": f"s3://{src}"}, 422, "invalid_parameter", "is not an s3://bucket/key URI"),
            ({"source": f"s3://{bucket}/pre/slides/x.svs"}, 403, "source_not_allowed", "own store"),
            ({"source": f"s3://{bucket}/pre"}, 403, "source_not_allowed", "own store"),
            ({"source": f"s3://{src}-other/cmu.svs"}, 403, "source_not_allowed", "MSTAR_S3_SOURCE_BUCKETS"),
            ({"analyze": "true"}, 422, "invalid_parameter", "exactly one of"),
        ]
        for fields, status, code, words in refusals:
            r = post(c, **fields)
            assert (r.status_code, r.json()["error"]["code"]) == (status, code), (fields, r.text)
            assert words in r.json()["error"]["message"]
        r = c.post("/slides", files={"file": ("x.svs", cmu_svs.read_bytes())}, data={"source": f"s3://{src}/a"})
        assert r.status_code == 422 and "exactly one of" in r.json()["error"]["message"]

        manifest = tmp_path / "m.csv"
        manifest.write_text(f"slide\ns3://{src}/cohort/cmu.svs\ns3://{src}/cohort/gone.svs\n")
        hb = HttpBatch(url, key, tmp_path / "state")
        try:
            out = hb.submit(manifest)
            assert (out["queued"], out["failed_ingest"]) == (1, 1)
            items = hb.status(out["batch_id"])
            assert items[0]["job_id"] and items[1]["error_code"] == "slide_not_found"
        finally:
            hb.client.close()
        assert c.get("/slides").json()["total"] == 1  # the batch's line is the same slide
    stored = [o["Key"] for o in s3c.list_objects_v2(Bucket=bucket, Prefix="pre/slides/")["Contents"]]
    assert len(stored) == 1 and stored[0].endswith(".svs")  # nothing left behind by the refusals
    assert not [p for p in make_blob_store(settings).staging.rglob("*") if p.is_file()]

    files = Settings(data_dir=tmp_path / "fs", **common)
    with live_server(create_app(files)) as url, httpx.Client(base_url=url, headers=auth, timeout=60) as c:
        r = post(c, source=f"s3://{src}/cohort/cmu.svs")
        assert r.status_code == 422 and "MSTAR_BLOB_URL=s3://" in r.json()["error"]["message"]


# --- one job end to end -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    from inference_fixtures import build_tiny_bundle

    return build_tiny_bundle(tmp_path_factory.getbasetemp())  # shared with the other e2e tests of the session


@pytest.mark.services
def test_job_through_a_real_worker_with_only_the_bucket_shared(
    moto: MotoServer, bucket: str, tmp_path: Path, request, bundle_dir: Path, cmu_svs: Path
) -> None:
    """Gateway and `mstar worker` have separate data folders: slides and results meet only in the bucket."""

    from service.api import create_app

    pg, redis = request.getfixturevalue("postgres_url"), request.getfixturevalue("redis_server")
    common = {
        "MSTAR_DATABASE_URL": fresh_database(pg, "mstar_s3"),
        "MSTAR_BROKER_URL": redis.url.rsplit("/", 1)[0] + "/5",  # a database of its own on the shared Redis
        "MSTAR_BLOB_URL": f"s3://{bucket}/deploy",
        "MSTAR_S3_ENDPOINT_URL": moto.url,
        "MSTAR_BUNDLE_DIR": str(bundle_dir),
        "MSTAR_WORKER_LEASE_S": "5",
    }
    log = tmp_path / "worker.log"
    key = "s3-e2e-key-0123456789abcdef"
    settings = Settings(
        **{k.removeprefix("MSTAR_").lower(): v for k, v in common.items()},
        data_dir=tmp_path / "gateway",
        api_keys=[{"tenant": "lab", "key": key}],
    )
    worker_env = {**os.environ, **common, "MSTAR_DATA_DIR": str(tmp_path / "worker")}
    with mstar_worker(worker_env, "s3w", log, ["--concurrency", "1"], timeout=90):
        assert "blob store: s3://" in log.read_text()
        with (
            live_server(create_app(settings)) as url,
            httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c,
        ):
            assert c.get("/readyz").status_code == 200
            r = c.post("/slides", files={"file": ("CMU-1-Small-Region.svs", cmu_svs.read_bytes())})
            assert r.status_code == 202, r.text
            job_url = r.headers["location"]
            job = wait_job(c, job_url, timeout=180)
            assert job["state"] == "succeeded", (job, log.read_text()[-3000:])
            got = {}
            for path, ctype in (
                ("result", "application/json"),
                ("features", "application/x-hdf5"),
                ("heatmap.png", "image/png"),
            ):
                resp = c.get(f"{job_url}/{path}")
                assert resp.status_code == 200 and resp.headers["content-type"].startswith(ctype)
                assert hashlib.sha256(resp.content).hexdigest() == resp.headers["x-content-sha256"]
                assert int(resp.headers["content-length"]) == len(resp.content)
                got[path] = resp
            assert got["result"].json()["status"] == "analyzed"
            assert got["features"].headers["content-disposition"].startswith("attachment")
            fc = c.get(f"{job_url}/annotations.geojson")  # built from result files read back from the bucket
            assert fc.status_code == 200 and len(fc.json()["features"]) > got["result"].json()["tiling"]["patches"]
    client = boto3.client("s3", endpoint_url=moto.url)
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="deploy/")["Contents"]}
    names = {k.rsplit("/", 1)[-1] for k in keys if k.startswith("deploy/results/")}
    assert names == {"result.json", "features.h5", "heatmap.png", "patch_scores.h5"}
    assert any(k.startswith("deploy/slides/") for k in keys)
    assert not (tmp_path / "gateway" / "blobs").exists() and not (tmp_path / "worker" / "blobs").exists()
    cached = list((tmp_path / "worker" / "s3-cache").glob("*/*.svs"))
    assert len(cached) == 1 and cached[0].stat().st_size == cmu_svs.stat().st_size  # read once, on the worker
