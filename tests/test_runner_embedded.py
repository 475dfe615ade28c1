"""The embedded runner: spawned worker processes, progress, cancel, failures, crashes and restart recovery.

The pipelines are small real functions (`tests/runner_pipelines.py`) that open the real CMU slide; the runner,
store, blob store and worker processes are the production ones.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from services import postgres_url  # noqa: F401  (session fixture: a real PostgreSQL server)
from sqlalchemy import text

from service.config import Settings
from service.runner import EmbeddedRunner, execute_job
from service.store import repo
from service.store.blobs import FileBlobStore
from service.store.db import init_db, make_engine, session_factory, transaction
from service.store.models import Job, Slide, new_id


@pytest.fixture
def env(request, tmp_path: Path, cmu_svs: Path, tcga_j2k_svs: Path):
    database = getattr(request, "param", "sqlite")
    url = request.getfixturevalue("postgres_url") if database == "postgresql" else None
    settings = Settings(
        data_dir=tmp_path,
        database_url=url,
        runner_workers=2,
        runner_poll_s=0.1,
        job_max_attempts=2,
        pipeline="runner_pipelines:tiny",
    )
    engine = make_engine(settings.db_url)
    init_db(engine)
    if url:  # one server per session: start from empty tables
        with engine.begin() as conn:
            conn.execute(text("TRUNCATE results, jobs, slides, api_keys, tenants CASCADE"))
    factory = session_factory(engine)
    blobs = FileBlobStore(settings.blob_dir)
    slides = {}
    with transaction(factory) as s:
        tenant = repo.ensure_tenant(s, "lab")
        for name, src in (("cmu", cmu_svs), ("nompp", tcga_j2k_svs)):
            sid = new_id()
            key = f"slides/{tenant.id}/{sid}.svs"
            blobs.put_file(key, src)
            s.add(
                Slide(
                    id=sid,
                    tenant_id=tenant.id,
                    sha256=name * 10,
                    format="svs",
                    size_bytes=src.stat().st_size,
                    blob_key=key,
                    info={},
                )
            )
            slides[name] = sid

    def submit(slide: str = "cmu", **options) -> str:
        with transaction(factory) as s:
            return repo.create_job(s, tenant_id=tenant.id, slide_id=slides[slide], options=options)[0].id

    def job(job_id: str) -> Job:
        with factory() as s:
            return s.get(Job, job_id)

    yield settings, submit, job, factory, blobs
    engine.dispose()


def _wait(job, job_id: str, states=("succeeded", "failed", "canceled"), timeout: float = 90.0) -> Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        j = job(job_id)
        if j.state in states:
            return j
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} stuck in {job(job_id).state}")


def test_jobs_run_in_worker_processes_and_publish_results(env) -> None:
    settings, submit, job, factory, blobs = env
    outcomes = []
    runner = EmbeddedRunner(settings, on_outcome=outcomes.append)
    runner.start()
    try:
        ids = [submit(tasks=["embedding"]) for _ in range(3)]
        done = [_wait(job, i) for i in ids]
        assert runner.health()["ok"]
    finally:
        runner.stop()
    assert [j.state for j in done] == ["succeeded"] * 3
    assert all(j.progress == 1.0 and j.attempts == 1 and "embed" in j.stage_seconds for j in done)
    with factory() as s:
        files = repo.get_result(s, done[0].tenant_id, ids[0]).files
    assert set(files) == {"result.json", "features.h5", "heatmap.png"}
    result = json.loads(blobs.local_path(files["result.json"]["key"]).read_text())
    assert result["worker_pid"] != os.getpid()  # decoded in a worker process, not here
    assert result["tasks"] == ["embedding"] and result["n_patches"] == 16
    assert {o.state for o in outcomes} == {"succeeded"} and outcomes[0].n_patches == 16
    assert not list(settings.work_dir.iterdir())  # scratch cleaned


def test_refusals_and_internal_errors_are_recorded(env) -> None:
    settings, submit, job, _, _ = env
    runner = EmbeddedRunner(settings)
    runner.start()
    try:
        refused = _wait(job, submit("nompp"))
        overridden = _wait(job, submit("nompp", mpp_override=0.5))
    finally:
        runner.stop()
    assert refused.state == "failed" and refused.error_code == "missing_mpp"
    assert overridden.state == "succeeded"
    # An unexpected exception: generic message, no internals (paths) leak to the user.
    broken = settings.model_copy(update={"pipeline": "runner_pipelines:broken"})
    job_id = submit()
    with transaction(session_factory(make_engine(settings.db_url))) as s:
        assert repo.claim_next(s, "test") == job_id
    outcome = execute_job(job_id, broken)
    j = job(job_id)
    assert outcome.state == j.state == "failed" and j.error_code == "internal_error"
    assert "/secret" not in j.error_message


def test_cancel_stops_a_running_job(env) -> None:
    settings, submit, job, factory, blobs = env
    runner = EmbeddedRunner(settings.model_copy(update={"pipeline": "runner_pipelines:slow"}))
    runner.start()
    try:
        job_id = submit()
        _wait(job, job_id, states=("running",))
        deadline = time.monotonic() + 30
        while job(job_id).stage != "embed" and time.monotonic() < deadline:
            time.sleep(0.1)
        with transaction(factory) as s:
            repo.request_cancel(s, s.get(Job, job_id))
        j = _wait(job, job_id, timeout=30)
    finally:
        runner.stop()
    assert j.state == "canceled" and j.error_code == "canceled"
    assert not blobs.exists(f"results/{j.tenant_id}/{job_id}/result.json")


def test_worker_crash_is_retried_then_failed_and_the_pool_recovers(env) -> None:
    settings, submit, job, _, _ = env
    crash = settings.model_copy(update={"pipeline": "runner_pipelines:crash", "runner_workers": 1})
    runner = EmbeddedRunner(crash)
    runner.start()
    try:
        j = _wait(job, submit())
        assert j.state == "failed" and j.error_code == "worker_crashed" and j.attempts == 2
        assert runner.health()["ok"]  # a fresh pool replaced the broken one
        runner.pipeline = "runner_pipelines:tiny"
        assert _wait(job, submit()).state == "succeeded"
    finally:
        runner.stop()


@pytest.mark.parametrize("env", ["sqlite", "postgresql"], indirect=True)
def test_jobs_left_by_a_stopped_server_run_at_next_start(env) -> None:
    settings, submit, job, _, _ = env
    slow = settings.model_copy(update={"pipeline": "runner_pipelines:slow", "runner_workers": 1})
    first = EmbeddedRunner(slow)
    first.start()
    running, waiting = submit(), submit()
    _wait(job, running, states=("running",))
    first.stop()  # the server goes away mid-job: workers are killed, rows stay as they were
    assert job(running).state == "running" and job(waiting).state == "queued"

    second = EmbeddedRunner(settings)
    second.start()
    try:
        a, b = _wait(job, running), _wait(job, waiting)
    finally:
        second.stop()
    assert a.state == b.state == "succeeded"
    assert a.attempts == 2 and b.attempts == 1


def test_slide_deleted_during_the_job_leaves_no_files(env) -> None:
    settings, submit, job, factory, blobs = env
    runner = EmbeddedRunner(settings.model_copy(update={"pipeline": "runner_pipelines:slow"}))
    runner.start()
    try:
        job_id = submit()
        j = _wait(job, job_id, states=("running",))
        with transaction(factory) as s:
            repo.delete_slide(s, s.get(Slide, j.slide_id))
        deadline = time.monotonic() + 30
        while runner.health()["busy"] and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        runner.stop()
    assert not (blobs.root / "results" / j.tenant_id / job_id).exists()
    shutil.rmtree(settings.work_dir, ignore_errors=True)
