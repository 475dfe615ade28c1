"""The embedded runner: spawned worker processes, progress, cancel, failures, crashes, time limits, restart
recovery, and one signed webhook per terminal job (sent to a real HTTP receiver on loopback).

The pipelines are small real functions (`tests/runner_pipelines.py`) that open the real CMU slide; the runner,
store, blob store and worker processes are the production ones.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr
from services import live_server, postgres_url, webhook_receiver  # noqa: F401  (session fixture: a real PostgreSQL server)
from sqlalchemy import text

from service import webhooks
from service.api import create_app
from service.config import BootstrapKey, Settings, time_limits
from service.errors import InvalidParameterError
from service.jobs import lifecycle
from service.jobs.embedded import EmbeddedRunner
from service.jobs.execute import execute_job
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

    def submit(slide: str = "cmu", *, webhook_url: str | None = None, **options) -> str:
        with transaction(factory) as s:
            return lifecycle.create(
                s, tenant_id=tenant.id, slide_id=slides[slide], options=options, webhook_url=webhook_url
            )[0].id

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
        lease = lifecycle.claim_fair(s, "test")
        assert lease.job_id == job_id
    outcome = execute_job(lease, broken)
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
            lifecycle.request_cancel(s, s.get(Job, job_id))
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
        assert "exit code 139" in j.error_message
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


SECRET = "whsec-embedded"
WEBHOOKS = {"webhook_secret": SecretStr(SECRET), "webhook_allow_private": True, "webhook_backoff_s": 0.05}
SOFT_S, HARD_S = 2.0, 4.0


@pytest.fixture
def hooks():
    """A real webhook receiver on loopback: (url, [(headers, body), ...]), answering 204."""
    with webhook_receiver() as hook:
        yield hook


def _until(got: list, n: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        time.sleep(0.05)


def _by_job(got: list[tuple[dict, bytes]]) -> dict[str, list[dict]]:
    """Verified payloads per job id (every delivery must carry a valid signature)."""
    out: dict[str, list[dict]] = {}
    for headers, body in got:
        ts, sig = headers[webhooks.TIMESTAMP_HEADER], headers[webhooks.SIGNATURE_HEADER]
        assert webhooks.verify(SECRET, ts, body, sig)
        payload = json.loads(body)
        out.setdefault(payload["job_id"], []).append(payload)
    return out


def _seconds(j: Job) -> float:
    return (j.finished_at - j.started_at).total_seconds()


def test_time_limits_stop_hung_jobs_and_every_ending_sends_one_signed_webhook(env, hooks) -> None:
    """A job stuck where no signal reaches it is killed at the hard limit and one hung in Python code is stopped
    by the soft limit; a fresh worker takes over and the next jobs run. Success, failure, both time limits and a
    job failed by restart recovery each send exactly one signed webhook, and a restart sends none again."""
    settings, submit, job, _, _ = env
    url, got = hooks
    limited = settings.model_copy(
        update={
            "pipeline": "runner_pipelines:scripted",
            "runner_workers": 1,
            "job_max_attempts": 1,
            "task_time_limit_s": HARD_S,
            "task_soft_time_limit_s": SOFT_S,
            **WEBHOOKS,
        }
    )
    runner = EmbeddedRunner(limited)
    runner.start()
    try:
        ids = {b: submit(webhook_url=url, extra={"behave": b}) for b in ("stuck", "hang", "broken", "tiny")}
        done = {b: _wait(job, i, timeout=60) for b, i in ids.items()}
        assert runner.health()["ok"]
        _until(got, 4)
        left = submit(webhook_url=url, extra={"behave": "slow"})
        _wait(job, left, states=("running",))
    finally:
        runner.stop()  # the gateway goes away mid-job, at the job's last attempt
    second = EmbeddedRunner(limited)
    second.start()  # recovery fails it (worker_lost) and its webhook leaves; the others are not sent again
    try:
        lost = _wait(job, left)
        _until(got, 5)
        time.sleep(1.0)  # a second delivery, if any, would arrive meanwhile
    finally:
        second.stop()

    stuck, hang = done["stuck"], done["hang"]
    assert stuck.state == "failed" and stuck.error_code == "time_limit" and "hard time limit" in stuck.error_message
    # lower bounds exact, upper bounds loose: on a loaded 2-core CI machine the kill is seen a few seconds late
    # (the message, not the clock, says which limit stopped the job)
    assert HARD_S <= _seconds(stuck) < HARD_S + 8
    assert hang.state == "failed" and hang.error_code == "time_limit" and "soft time limit" in hang.error_message
    assert SOFT_S <= _seconds(hang) < HARD_S + 8
    assert done["broken"].error_code == "internal_error" and done["tiny"].state == "succeeded"
    assert lost.state == "failed" and lost.error_code == "worker_lost"
    assert not list(settings.work_dir.glob(f"job-{ids['stuck']}-*"))  # the killed worker's scratch is gone
    by_job = _by_job(got)
    assert {j: len(p) for j, p in by_job.items()} == {i: 1 for i in [*ids.values(), left]}
    codes = {b: (by_job[i][0]["state"], (by_job[i][0]["error"] or {}).get("code")) for b, i in ids.items()}
    assert codes == {
        "stuck": ("failed", "time_limit"),
        "hang": ("failed", "time_limit"),
        "broken": ("failed", "internal_error"),
        "tiny": ("succeeded", None),
    }
    assert by_job[ids["tiny"]][0]["result_url"] == f"/jobs/{ids['tiny']}/result"
    assert by_job[left][0]["error"]["code"] == "worker_lost"
    assert all(job(i).webhook_claimed_at is not None for i in [*ids.values(), left])


def test_api_cancel_sends_one_webhook_for_queued_running_and_unresponsive_jobs(env, hooks) -> None:
    """Through the real gateway: a queued job canceled at once, a running one at its next poll, and one that
    ignores its cancel is stopped by killing its worker after the grace period; one signed webhook each."""
    settings, submit, job, _, _ = env
    url, got = hooks
    key = "lab-key-0123456789abcdef"
    conf = settings.model_copy(
        update={
            "pipeline": "runner_pipelines:scripted",
            "runner_workers": 1,
            "api_keys": [BootstrapKey(tenant="lab", key=SecretStr(key))],
            **WEBHOOKS,
        }
    )
    running, queued, deaf = (submit(webhook_url=url, extra={"behave": b}) for b in ("slow", "slow", "stuck"))
    runner = EmbeddedRunner(conf, cancel_grace_s=1.0)
    with (
        live_server(create_app(conf, queue=runner)) as base,
        httpx.Client(base_url=base, headers={"X-API-Key": key}) as c,
    ):
        _wait(job, running, states=("running",))
        assert c.post(f"/jobs/{queued}/cancel").json()["state"] == "canceled"
        assert c.post(f"/jobs/{running}/cancel").status_code == 202
        assert _wait(job, running, timeout=30).state == "canceled"
        _wait(job, deaf, states=("running",))
        t0 = time.monotonic()
        assert c.post(f"/jobs/{deaf}/cancel").status_code == 202
        stopped = _wait(job, deaf, timeout=30)
        waited = time.monotonic() - t0
        _until(got, 3)
        time.sleep(1.0)  # a second delivery, if any, would arrive meanwhile
        assert c.post(f"/jobs/{queued}/cancel").status_code == 409
        assert runner.health()["ok"]
    assert stopped.state == "canceled" and stopped.error_code == "canceled" and 1.0 <= waited < 10
    by_job = _by_job(got)
    assert {j: len(p) for j, p in by_job.items()} == {running: 1, queued: 1, deaf: 1}
    assert {p[0]["state"] for p in by_job.values()} == {"canceled"}
    assert all(job(i).webhook_claimed_at is not None for i in (running, queued, deaf))


def test_time_limits_follow_the_celery_settings(env) -> None:
    settings = env[0]
    assert time_limits(Settings(data_dir=settings.data_dir)) == (3240.0, 3600.0)
    with pytest.raises(InvalidParameterError, match="must be below"):
        EmbeddedRunner(settings.model_copy(update={"task_time_limit_s": 5.0, "task_soft_time_limit_s": 5.0}))


def test_a_job_whose_ending_was_never_recorded_runs_again_or_fails(env) -> None:
    """With the job store's disk full, a worker's verdict and then the runner's crash handling both failed to
    commit, and the job stayed `running` for ever (a cancel could not end it; a batch behind it never finished).
    The runner's periodic sweep now takes such jobs, claimed by it and held by none of its workers, as after a
    worker crash: run again, or failed once out of attempts."""
    from service.store.models import utcnow

    settings, submit, job, factory, _ = env
    runner = EmbeddedRunner(settings)
    lost, spent = submit(tasks=["embedding"]), submit(tasks=["embedding"])
    with transaction(factory) as s:  # claimed by this runner, its ending never recorded
        for job_id, attempts in ((lost, 1), (spent, settings.job_max_attempts)):
            j = s.get(Job, job_id)
            j.state, j.worker, j.attempts, j.started_at, j.heartbeat_at = (
                "running",
                runner.worker_name,
                attempts,
                utcnow(),
                utcnow(),
            )
    runner._reap_own()
    assert job(lost).state == "queued"
    failed = job(spent)
    assert failed.state == "failed" and failed.error_code == "worker_crashed"
    assert "could not be recorded" in failed.error_message
    runner.start()
    try:
        assert _wait(job, lost).state == "succeeded"
    finally:
        runner.stop()
