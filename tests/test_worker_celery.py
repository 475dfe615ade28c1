"""Distributed workers against real services: Redis (AOF), PostgreSQL and two `mstar worker` processes.

Slides are copies of the real CMU SVS with a trailer telling the test pipeline (`worker_pipelines:marked`)
to run normally, slowly, abort like a crashing decoder, or hang; the normal path is the real tiling pipeline.
Time limits are shrunk (hard 8 s, visibility 10 s, restore sweep 1 s) so crash recovery takes seconds.
Webhooks go to a real HTTP receiver in the test process, signed with the workers' secret.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
from services import free_port, fresh_database, mstar_serve, postgres_url, redis_server, webhook_receiver  # noqa: F401
from worker_pipelines import make_slide

from service import webhooks
from service.batch import BatchService
from service.config import Settings
from service.jobs import lifecycle
from service.jobs.celery_queue import CeleryQueue
from service.jobs.factory import make_queue
from service.store import repo
from service.store.db import init_db, make_engine, session_factory, transaction
from service.store.models import Job, Result, Slide, new_id

pytestmark = pytest.mark.services

HARD_S, VISIBILITY_S = 8, 10
WEBHOOK_SECRET = "whsec-workers"
TESTS_DIR = Path(__file__).resolve().parent
MSTAR = Path(sys.executable).with_name("mstar")


class Cluster:
    """Worker subprocesses (each in its own process group, so SIGKILL takes the master and its pool)."""

    def __init__(self, root: Path, env: dict[str, str], kwargs: dict) -> None:
        self.root, self.env, self.kwargs = root, env, kwargs
        self.settings = Settings(**kwargs)
        self.procs: dict[str, subprocess.Popen] = {}
        self.metrics_ports: dict[str, int] = {}

    def start(self, name: str) -> None:
        log = (self.root / f"{name}.log").open("ab")
        port = self.metrics_ports.setdefault(name, free_port())
        self.procs[name] = subprocess.Popen(
            [str(MSTAR), "worker", "--name", f"{name}@test", "--concurrency", "1", "--metrics-port", str(port)],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, names: list[str], timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        for name in names:
            while f"{name}@test ready" not in (self.root / f"{name}.log").read_text(errors="replace"):
                if self.procs[name].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"worker {name} did not start:\n{self.log(name)[-3000:]}")
                time.sleep(0.2)

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def ensure(self) -> None:
        dead = [n for n, p in self.procs.items() if p.poll() is not None]
        for name in dead:
            with (self.root / f"{name}.log").open("w"):  # a fresh log, so `ready` means this start
                pass
            self.start(name)
        if dead:
            self.wait_ready(dead)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.kill(name)


@pytest.fixture(scope="module")
def pg_db(postgres_url: str) -> str:  # noqa: F811
    """A database of our own on the shared server: no other test's runner can see these jobs."""
    return fresh_database(postgres_url, "mstar_workers")  # workers create the schema (racing: see cli)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, pg_db: str, redis_server):  # noqa: F811
    import redis

    redis.Redis.from_url(redis_server.url).flushdb()
    root = tmp_path_factory.mktemp("cluster")
    values = {
        "MSTAR_DATA_DIR": str(root / "data"),
        "MSTAR_DATABASE_URL": pg_db,
        "MSTAR_BROKER_URL": redis_server.url,
        "MSTAR_PIPELINE": "worker_pipelines:marked",
        "MSTAR_TASK_TIME_LIMIT_S": str(HARD_S),
        "MSTAR_BROKER_VISIBILITY_TIMEOUT_S": str(VISIBILITY_S),
        "MSTAR_BROKER_RESTORE_INTERVAL_S": "1",
        "MSTAR_WORKER_LEASE_S": "3",
        "MSTAR_JOB_MAX_ATTEMPTS": "2",
        "MSTAR_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "MSTAR_WEBHOOK_ALLOW_PRIVATE": "true",
        "MSTAR_WEBHOOK_BACKOFF_S": "0.2",
    }
    env = {
        **os.environ,
        **values,
        "MSTAR_TEST_RUNLOG": str(root / "runs.log"),
        "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
    }
    c = Cluster(root, env, {k.removeprefix("MSTAR_").lower(): v for k, v in values.items()})
    c.start("w1")
    c.start("w2")
    try:
        c.wait_ready(["w1", "w2"])
        yield c
    finally:
        c.stop_all()


@pytest.fixture()
def svc(cluster: Cluster):
    cluster.ensure()
    service = BatchService(cluster.settings)
    queue = CeleryQueue(cluster.settings, default_queue="batch")
    yield service, queue
    queue.stop()
    service.close()


def _slides(root: Path, src: Path, actions: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    names = [make_slide(src, root / f"s{i}_{a.replace('=', '')}.svs", a).name for i, a in enumerate(actions)]
    manifest = root / "manifest.csv"
    manifest.write_text("slide,id,label\n" + "".join(f"{n},case{i},L{i % 2}\n" for i, n in enumerate(names)))
    return manifest


def _wait(service: BatchService, batch_id: str, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        st = service.status(batch_id)
        if st.finished:
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"batch not finished in {timeout} s: {st.counts()}")
        time.sleep(0.3)


def _runs(cluster: Cluster, job_id: str) -> int:
    log = cluster.root / "runs.log"
    lines = log.read_text().split() if log.exists() else []
    return sum(1 for line in lines if line.startswith(f"job-{job_id}-"))


def test_batch_through_cli_completes_gathers_and_resumes(cluster: Cluster, svc, cmu_svs: Path, tmp_path: Path):
    service, queue = svc
    manifest = _slides(tmp_path / "b1", cmu_svs, ["ok", "ok", "ok", "ok"])
    with manifest.open("a") as fh:
        fh.write("missing.svs,case9,L1\n")
    run = subprocess.run(
        [str(MSTAR), "submit", str(manifest), "--poll", "0.3"],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    first, last = (json.loads(line) for line in run.stdout.strip().splitlines()[-2:])
    assert first["queued"] == 4 and first["failed_ingest"] == 1
    assert last["succeeded"] == 4 and last["failed"] == 1 and last["remaining"] == 0
    assert "patches/s" in run.stderr and "remaining 0" in run.stderr  # the progress bar
    batch_id = first["batch_id"]

    status = subprocess.run(
        [str(MSTAR), "batch", "status", batch_id, "--json"], env=cluster.env, capture_output=True, text=True, timeout=60
    )
    assert status.returncode == 0, status.stderr
    body = json.loads(status.stdout)
    assert body["counts"]["succeeded"] == 4 and body["counts"]["failed"] == 1
    assert [i["state"] for i in body["items"]] == ["succeeded"] * 4 + ["failed"]

    out = tmp_path / "results"
    got = subprocess.run(
        [str(MSTAR), "batch", "results", batch_id, "--out", str(out)],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert got.returncode == 0, got.stderr
    import csv

    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["state"] for r in rows] == ["succeeded"] * 4 + ["failed"]
    assert rows[4]["error_code"] == "slide_not_found" and "does not exist" in rows[4]["reason"]
    assert rows[0]["meta_label"] == "L0" and rows[0]["name"] == "case0"
    for r in rows[:4]:
        assert int(r["n_patches"]) > 0
        with h5py.File(out / r["features"]) as f:
            assert f["coords"].shape == (int(r["n_patches"]), 2)

    again = service.submit(manifest, tenant="default", queue=queue)  # same manifest path: same batch
    assert again.batch_id == batch_id
    assert again.skipped_done == 4 and again.queued == [] and again.failed_ingest == 1
    for it in service.status(batch_id).items[:4]:
        assert _runs(cluster, it.job_id) == 1 and it.attempts == 1


def test_sigkill_worker_mid_job_completes_once_on_the_other(cluster: Cluster, svc, cmu_svs: Path, tmp_path: Path):
    service, queue = svc
    manifest = _slides(tmp_path / "b2", cmu_svs, ["slow=3"])
    ref = service.submit(manifest, tenant="default", batch_id="0" * 31 + "1", queue=queue)
    ref_item = _wait(service, ref.batch_id, 60).items[0]
    assert ref_item.state == "succeeded"

    victim = service.submit(manifest, tenant="default", batch_id="0" * 31 + "2", queue=queue)
    job_id = victim.queued[0]
    deadline = time.monotonic() + 30
    while True:  # until a worker is inside the job's pipeline
        with transaction(service.sessions) as s:
            job = s.get(Job, job_id)
            if job.state == "running" and job.stage == "wait" and job.progress > 0.2:
                node = job.worker.split("@")[0]
                break
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.1)
    t_kill = time.monotonic()
    cluster.kill(node)
    st = _wait(service, victim.batch_id, VISIBILITY_S + 40)
    recovered_s = time.monotonic() - t_kill
    item = st.items[0]
    assert item.state == "succeeded", (item.error_code, item.reason)
    assert item.attempts == 2
    with transaction(service.sessions) as s:
        job = s.get(Job, job_id)
        assert not job.worker.startswith(node)
        files = dict(s.get(Result, job_id).files)
        ref_files = dict(s.get(Result, ref_item.job_id).files)
    assert _runs(cluster, job_id) == 1  # the killed attempt never completed; the second ran once
    assert not list(cluster.settings.work_dir.glob(f"job-{job_id}-*"))  # its scratch was cleaned up
    assert files.keys() == ref_files.keys()
    assert files["features.h5"]["sha256"] == ref_files["features.h5"]["sha256"]
    with service.blobs.open(files["result.json"]["key"]) as a, service.blobs.open(ref_files["result.json"]["key"]) as b:
        ra, rb = json.load(a), json.load(b)
    assert ra["tiling"] == rb["tiling"] and ra["slide"] == rb["slide"]
    assert recovered_s < VISIBILITY_S + 30


def test_decoder_crash_and_hang_fail_with_reasons_rest_completes(cluster: Cluster, svc, cmu_svs: Path, tmp_path: Path):
    service, queue = svc
    manifest = _slides(tmp_path / "b3", cmu_svs, ["ok", "abort", "hang", "ok", "ok", "sleep"])
    rep = service.submit(manifest, tenant="default", queue=queue)
    st = _wait(service, rep.batch_id, HARD_S * 2 + 40)
    states = {it.name: it for it in st.items}
    assert [states[f"case{i}"].state for i in (0, 3, 4)] == ["succeeded"] * 3
    crash = states["case1"]
    assert crash.state == "failed" and crash.error_code == "worker_crashed"
    assert "SIGABRT" in crash.reason and crash.attempts == 2
    hang = states["case2"]
    assert hang.state == "failed" and hang.error_code == "time_limit" and "time limit" in hang.reason
    assert hang.seconds is not None and hang.seconds < HARD_S + 5
    soft = states["case5"]  # interrupted by the soft limit (90% of the hard one) inside the pipeline
    assert soft.state == "failed" and soft.error_code == "time_limit" and "soft time limit" in soft.reason
    assert soft.seconds is not None and soft.seconds < HARD_S
    for name, proc in cluster.procs.items():  # the workers carried on
        assert proc.poll() is None, cluster.log(name)[-2000:]


def test_master_verdicts_send_one_signed_webhook_and_dicom_folders_run(
    cluster: Cluster, svc, cmu_svs: Path, dicom_dir: Path, tmp_path: Path
):
    """A child killed at its last attempt (SIGABRT twice) and a child past the hard limit: the pool master
    decides both failures and each job's webhook arrives once, signed, with the reason. A DICOM WSI folder on
    the same manifest runs on a worker (its webhook comes from the task, also once)."""
    service, queue = svc
    manifest = _slides(tmp_path / "b7", cmu_svs, ["abort", "hang"])
    with manifest.open("a") as fh:
        fh.write(f"{dicom_dir},dicom,L0\n")
    with webhook_receiver() as (hook_url, got):
        rep = service.submit(manifest, tenant="default", queue=None)  # jobs created, published below
        assert len(rep.queued) == 3
        with transaction(service.sessions) as s:  # each job gets a webhook before it is published
            for job_id in rep.queued:
                s.get(Job, job_id).webhook_url = hook_url
        for job_id in rep.queued:
            queue.notify(job_id, queue="batch")
        st = _wait(service, rep.batch_id, HARD_S * 2 + 40)
        deadline = time.monotonic() + 15
        while len(got) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2.0)  # a second delivery, if any, would arrive meanwhile
    items = {it.name: it for it in st.items}
    assert [items[n].state for n in ("case0", "case1", "dicom")] == ["failed", "failed", "succeeded"]
    by_job: dict[str, list] = {}
    for headers, body in got:
        ts, sig = headers[webhooks.TIMESTAMP_HEADER], headers[webhooks.SIGNATURE_HEADER]
        assert webhooks.verify(WEBHOOK_SECRET, ts, body, sig)
        payload = json.loads(body)
        by_job.setdefault(payload["job_id"], []).append(payload)
    assert {j: len(v) for j, v in by_job.items()} == {job_id: 1 for job_id in rep.queued}
    with transaction(service.sessions) as s:  # each sender recorded its outcome against its own claim
        assert all(s.get(Job, j).webhook_delivered is True for j in rep.queued)
    crash, hang, dicom = (by_job[items[n].job_id][0] for n in ("case0", "case1", "dicom"))
    assert crash["state"] == "failed" and crash["error"]["code"] == "worker_crashed"
    assert "SIGABRT" in crash["error"]["message"] and items["case0"].attempts == 2
    assert hang["state"] == "failed" and hang["error"]["code"] == "time_limit"
    assert "hard time limit" in hang["error"]["message"]
    assert dicom["state"] == "succeeded" and dicom["error"] is None
    result = service._result_json(items["dicom"].job_id)
    assert result["tiling"]["patches"] > 0 and result["slide"]["format"] == "dicom-dir"


def _published(redis_url: str) -> dict[str, int]:
    """How many task messages for each job id wait in the broker (every queue list of this Redis db)."""
    import base64

    import redis

    client = redis.Redis.from_url(redis_url)
    counts: dict[str, int] = {}
    for key in client.scan_iter():
        if client.type(key) != b"list":
            continue
        for raw in client.lrange(key, 0, -1):
            msg = json.loads(raw)
            args = json.loads(base64.b64decode(msg["body"]))[0]
            counts[args[0]] = counts.get(args[0], 0) + 1
    return counts


def _queued_jobs(settings: Settings, options: list[dict]):
    """(engine, sessions, job ids): a fresh job store with one queued job per `options`, never published."""
    engine = make_engine(settings.db_url)
    init_db(engine)
    sessions = session_factory(engine)
    with transaction(sessions) as s:
        tenant = repo.ensure_tenant(s, "lab")
        slide = Slide(id=new_id(), tenant_id=tenant.id, sha256="0" * 64, format="svs", size_bytes=1, blob_key="x")
        s.add(slide)
        s.flush()
        ids = [lifecycle.create(s, tenant_id=tenant.id, slide_id=slide.id, options=o)[0].id for o in options]
    return engine, sessions, ids


def test_gateway_start_publishes_only_jobs_never_published(tmp_path: Path, redis_server):  # noqa: F811
    """A restart must not publish a second message for every waiting job: only for rows committed but never
    published (a crash between commit and publish)."""
    broker = redis_server.url.rsplit("/", 1)[0] + "/3"  # a db no worker consumes: the messages stay put
    import redis

    redis.Redis.from_url(broker).flushdb()
    settings = Settings(data_dir=tmp_path, broker_url=broker)
    engine, sessions, ids = _queued_jobs(settings, [{}, {}, {"batch_id": "b" * 32}])
    first = CeleryQueue(settings)
    first.notify(ids[0])  # published; ids[1] and ids[2] were committed, then the gateway died
    first.stop()
    assert _published(broker) == {ids[0]: 1}
    for _ in range(2):  # two restarts
        gateway = CeleryQueue(settings)
        gateway.start()
        gateway.stop()
        assert _published(broker) == {job_id: 1 for job_id in ids}
    with transaction(sessions) as s:
        assert all(s.get(Job, job_id).published_at is not None for job_id in ids)
    assert redis.Redis.from_url(broker).llen("batch:6") == 1  # the batch job went to the batch queue
    engine.dispose()


def test_submit_while_the_broker_is_down_is_accepted_and_published_once_it_answers(tmp_path: Path) -> None:
    """The broker (a real Redis, not started yet) does not answer when a gateway records a job: the publish fails
    in seconds (kombu's default retries took ~20 s), the submit is accepted (it was a 500 with the job created
    anyway, so a retry without an idempotency key duplicated it), the job stays queued and unpublished, and the
    gateway's next sweep publishes it once Redis is up. Without a sweep (`mstar submit`) the failure is raised."""
    from kombu.exceptions import OperationalError
    from services import RedisServer

    redis = RedisServer(tmp_path / "redis")
    settings = Settings(data_dir=tmp_path / "data", broker_url=redis.url)
    engine, sessions, (job_id,) = _queued_jobs(settings, [{}])
    cli = CeleryQueue(settings)
    with pytest.raises(OperationalError):
        cli.notify(job_id)
    cli.stop()
    gateway = CeleryQueue(settings)
    gateway.start()
    try:
        began = time.monotonic()
        gateway.notify(job_id)
        assert time.monotonic() - began < 15
        with transaction(sessions) as s:
            assert s.get(Job, job_id).published_at is None and s.get(Job, job_id).state == "queued"
        redis.start()
        gateway.sweep(gateway._sessions())
        assert _published(redis.url) == {job_id: 1}
        with transaction(sessions) as s:
            assert s.get(Job, job_id).published_at is not None
    finally:
        gateway.stop()
        redis.kill()
        engine.dispose()


def test_redis_restart_during_batch_loses_no_job(cluster: Cluster, svc, cmu_svs: Path, tmp_path: Path, redis_server):  # noqa: F811
    service, queue = svc
    manifest = _slides(tmp_path / "b4", cmu_svs, ["slow=1"] * 6)
    rep = service.submit(manifest, tenant="default", queue=queue)
    deadline = time.monotonic() + 40
    while service.status(rep.batch_id).counts()["succeeded"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    redis_server.kill()  # SIGKILL: AOF with appendfsync always keeps the queues and the unacked set
    time.sleep(1.0)
    redis_server.start()
    st = _wait(service, rep.batch_id, 90)
    assert [it.state for it in st.items] == ["succeeded"] * 6, [(it.error_code, it.reason) for it in st.items]
    for it in st.items:
        assert _runs(cluster, it.job_id) == 1


def test_gateway_upload_runs_on_workers_ahead_of_batch(cluster: Cluster, svc, cmu_svs: Path, tmp_path: Path):
    """`mstar serve` with a broker: uploads go to the interactive queue and overtake a waiting batch."""
    import httpx
    from services import live_server

    from service.api import create_app
    from service.batch_http import HttpBatch

    service, queue = svc
    key = "mstar-test-key-0123456789abcdef"
    settings = Settings(**cluster.kwargs, api_keys=[{"tenant": "default", "key": key}])
    assert isinstance(make_queue(settings), CeleryQueue)
    manifest = _slides(tmp_path / "b5", cmu_svs, ["slow=2"] * 8)
    upload = make_slide(cmu_svs, tmp_path / "upload.svs", "slow=0.5")
    with live_server(create_app(settings)) as url:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
            assert c.get("/readyz").status_code == 200
            up = c.post("/slides", files={"file": ("upload.svs", upload.read_bytes())}, data={"analyze": "false"})
            assert up.status_code == 201, up.text  # stored and checked now, so the analysis below is queued at once
            rep = service.submit(manifest, tenant="default", queue=queue)
            r = c.post(f"/slides/{up.json()['id']}/analyses", json={"tasks": ["embedding"]})
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]
            st = _wait(service, rep.batch_id, 90)
            deadline = time.monotonic() + 30
            while (job := c.get(f"/jobs/{job_id}").json())["state"] != "succeeded":
                assert time.monotonic() < deadline, job
                time.sleep(0.2)
        with transaction(service.sessions) as s:
            queued_at, interactive = s.get(Job, job_id).created_at, s.get(Job, job_id).started_at
            started = sorted(s.get(Job, it.job_id).started_at for it in st.items)
        # Queued behind the batch (two workers, one batch job each at a time), it starts at the next free worker:
        # at most one batch job per worker starts in between, and batch jobs still waiting start after it.
        between = [t for t in started if queued_at < t < interactive]
        assert len(between) <= 2, [(t - interactive).total_seconds() for t in started]
        waiting = [t for t in started if t > queued_at]
        assert len(waiting) < 3 or any(t > interactive for t in waiting), [
            (t - interactive).total_seconds() for t in started
        ]

        # `mstar submit --server`: the same batch machinery through the HTTP API.
        small = _slides(tmp_path / "b6", cmu_svs, ["ok", "ok"])
        hb = HttpBatch(url, key, tmp_path / "state")
        first = hb.submit(small)
        assert first["queued"] == 2
        counts = hb.follow(first["batch_id"], poll_s=0.3)
        assert counts["succeeded"] == 2
        assert hb.submit(small)["skipped_done"] == 2
        summary = hb.results(first["batch_id"], tmp_path / "http-results")
        rows = summary.read_text().splitlines()
        assert len(rows) == 3 and all(",succeeded," in r for r in rows[1:])
        assert len(list((tmp_path / "http-results" / "features").glob("*.h5"))) == 2


def _running(service: BatchService, job_id: str, timeout: float = 30) -> Job:
    deadline = time.monotonic() + timeout
    while True:  # until a worker is inside the job's pipeline
        with transaction(service.sessions) as s:
            job = s.get(Job, job_id)
            if job.state == "running" and job.stage == "wait" and job.progress > 0.15:
                return job
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.1)


def test_killing_a_worker_master_alone_takes_its_pool_child_too(cluster: Cluster, svc, cmu_svs: Path, tmp_path: Path):
    """SIGKILL the Celery master only (not its process group): its pool child running the job dies with it
    (parent-death signal) instead of finishing as an orphan, and the job completes once elsewhere."""
    import psutil

    service, queue = svc
    manifest = _slides(tmp_path / "b7", cmu_svs, ["slow=3"])
    rep = service.submit(manifest, tenant="default", queue=queue)
    job = _running(service, rep.queued[0])
    node = job.worker.split("@")[0]
    master = cluster.procs[node]
    children = psutil.Process(master.pid).children(recursive=True)
    assert children
    master.send_signal(signal.SIGKILL)
    master.wait(10)
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"pool children outlived their master: {[p.pid for p in alive]}"
    item = _wait(service, rep.batch_id, VISIBILITY_S + 40).items[0]
    assert item.state == "succeeded" and item.attempts == 2, (item.error_code, item.reason)
    assert _runs(cluster, rep.queued[0]) == 1  # the killed attempt never completed


def test_killing_the_gateway_alone_mid_job_loses_nothing(cluster: Cluster, svc, cmu_svs: Path, tmp_path: Path):
    """In Celery mode the gateway runs no job: SIGKILL it mid-job, the worker finishes, and a restarted gateway
    serves the result; the job ran once."""
    import hashlib

    import httpx

    cluster.ensure()
    key = "mstar-kill-gw-key-0123456789abcdef"
    port = free_port()
    env = {**cluster.env, "MSTAR_API_KEYS": json.dumps([{"tenant": "default", "key": key}])}
    log = tmp_path / "gateway.log"
    slide = make_slide(cmu_svs, tmp_path / "gw.svs", "slow=3")
    service, _ = svc
    with mstar_serve(env, port=port, log=log) as gateway:
        with httpx.Client(base_url=gateway.url, headers={"X-API-Key": key}, timeout=60) as c:
            r = c.post("/slides", files={"file": ("gw.svs", slide.read_bytes())})
            assert r.status_code == 202, r.text
            job_id = r.json()["job"]["id"]
        _running(service, job_id)
        gateway.kill(signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:  # the worker finishes while no gateway runs
        with transaction(service.sessions) as s:
            if s.get(Job, job_id).state == "succeeded":
                break
        assert time.monotonic() < deadline, "the job did not finish without its gateway"
        time.sleep(0.2)
    with (
        mstar_serve(env, port=port, log=log) as gateway,
        httpx.Client(base_url=gateway.url, headers={"X-API-Key": key}, timeout=60) as c,
    ):
        job = c.get(f"/jobs/{job_id}").json()
        assert job["state"] == "succeeded" and job["attempts"] == 1, job
        for path in ("result", "features"):
            got = c.get(f"/jobs/{job_id}/{path}")
            assert got.status_code == 200, got.text
            assert hashlib.sha256(got.content).hexdigest() == got.headers["X-Content-SHA256"]
        assert _runs(cluster, job_id) == 1


def _worker_metrics(cluster: Cluster) -> dict[tuple[str, tuple], float]:
    """Every worker's /metrics, summed by sample (as Prometheus' sum() over the worker targets would)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    total: dict[tuple[str, tuple], float] = {}
    for port in cluster.metrics_ports.values():
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                total[key] = total.get(key, 0.0) + s.value
    return total


def test_workers_record_and_expose_job_metrics(cluster: Cluster, svc, cmu_svs: Path, tmp_path: Path):
    """Celery mode: pool children record stages and outcomes in multiprocess files; each master serves
    them on --metrics-port. A crashing child's job is counted by its master's verdict, and the dead child no
    longer counts as running."""
    service, queue = svc
    ok = ("mstar_jobs_finished_total", (("code", ""), ("state", "succeeded")))
    crashed = ("mstar_jobs_finished_total", (("code", "worker_crashed"), ("state", "failed")))
    grid = ("mstar_job_stage_duration_seconds_count", (("stage", "grid"),))  # no bundle here: tiling stages only
    before = _worker_metrics(cluster)
    batch = service.submit(_slides(tmp_path / "m", cmu_svs, ["ok", "ok", "abort"]), queue=queue)
    st = _wait(service, batch.batch_id, 120)
    assert st.counts()["succeeded"] == 2 and st.counts()["failed"] == 1
    deadline = time.monotonic() + 20
    while True:  # the master's verdict and the children's files land just after the job rows
        after = _worker_metrics(cluster)
        delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in (ok, crashed, grid)}
        if (delta[ok] >= 2 and delta[crashed] >= 1) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert delta[ok] == 2 and delta[crashed] == 1, delta
    assert delta[grid] >= 2, delta
    assert after[("mstar_worker_jobs_running", ())] == 0  # the aborted child was marked dead
