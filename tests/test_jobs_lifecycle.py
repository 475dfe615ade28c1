"""The job lifecycle on real job stores (SQLite and PostgreSQL): fair claims across tenants, per-tenant caps and
quotas, idempotency with request digests, identical work done once, and scratch folders of dead processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from services import postgres_url  # noqa: F401  (session fixture: a real PostgreSQL server)
from sqlalchemy import text

from service.errors import IdempotencyConflictError, QuotaExceededError
from service.jobs import lifecycle
from service.jobs.execute import scratch_prefix, sweep_scratch
from service.store import repo
from service.store.db import init_db, make_engine, session_factory, transaction
from service.store.models import Job, Slide, new_id


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request, tmp_path):
    if request.param == "postgresql":
        engine = make_engine(request.getfixturevalue("postgres_url"))
        init_db(engine)
        with engine.begin() as conn:
            conn.execute(text("TRUNCATE results, jobs, slides, api_keys, tenants CASCADE"))
    else:
        engine = make_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
        init_db(engine)
    yield session_factory(engine)
    engine.dispose()


def _tenant_slide(sessions, name: str) -> tuple[str, str]:
    with transaction(sessions) as s:
        tenant = repo.ensure_tenant(s, name)
        slide = Slide(
            id=new_id(), tenant_id=tenant.id, sha256=new_id() * 2, format="svs", size_bytes=1, blob_key="k", info={}
        )
        s.add(slide)
        return tenant.id, slide.id


def _submit(sessions, tenant_slide, n: int = 1, **kw) -> list[str]:
    tenant_id, slide_id = tenant_slide
    out = []
    for _ in range(n):
        with transaction(sessions) as s:
            out.append(lifecycle.create(s, tenant_id=tenant_id, slide_id=slide_id, options={}, **kw)[0].id)
    return out


def _claim(sessions, worker: str = "w", **kw) -> lifecycle.Lease | None:
    with transaction(sessions) as s:
        return lifecycle.claim_fair(s, worker, **kw)


def test_one_tenants_backlog_does_not_stand_in_front_of_another(sessions):
    """Tenant A queues 30 jobs, then B one: B's job is the second claimed, not the 31st; with a cap of one running
    job per tenant, A's second job waits while B runs."""
    a, b = _tenant_slide(sessions, "a"), _tenant_slide(sessions, "b")
    flood = _submit(sessions, a, 30)
    (single,) = _submit(sessions, b)
    first, second = _claim(sessions), _claim(sessions)
    assert first.job_id == flood[0] and second.job_id == single  # oldest first, then the tenant with fewest running
    third = _claim(sessions)
    assert third.job_id == flood[1]
    with transaction(sessions) as s:  # with a cap of 2 running per tenant, A (2 running) must wait
        assert lifecycle.claim_fair(s, "w", max_running=2) is None
        assert lifecycle.waiting_for_capacity(s, lifecycle.INTERACTIVE, 2)
        assert lifecycle.succeed(s, first, {}, {}).won
        assert lifecycle.claim_fair(s, "w", max_running=2).job_id == flood[2]


def test_one_worker_slot_alternates_between_tenants(sessions):
    """One slot (the default): A queues 30 jobs, then B one. A's oldest runs first; when it is done, B's job is
    next, not A's 30 in turn: the tenant served least recently wins a tie in running jobs. Then back to A, and a
    tenant never served goes before one that has been."""
    a, b, c = _tenant_slide(sessions, "a"), _tenant_slide(sessions, "b"), _tenant_slide(sessions, "c")
    flood = _submit(sessions, a, 30)
    (single,) = _submit(sessions, b)
    order = []
    for _ in range(3):
        lease = _claim(sessions)
        order.append(lease.job_id)
        with transaction(sessions) as s:
            assert lifecycle.succeed(s, lease, {}, {}).won
    assert order == [flood[0], single, flood[1]]
    _submit(sessions, b)
    (late,) = _submit(sessions, c)
    assert _claim(sessions).job_id == late


def test_interactive_jobs_before_batch_and_tokens_stay_in_their_queue(sessions):
    a = _tenant_slide(sessions, "a")
    (batch,) = _submit(sessions, a)
    with transaction(sessions) as s:
        s.get(Job, batch).queue = lifecycle.BATCH
    (interactive,) = _submit(sessions, a)
    assert _claim(sessions, queue=lifecycle.BATCH).job_id == batch
    assert _claim(sessions, queue=lifecycle.BATCH) is None
    assert _claim(sessions).job_id == interactive


def test_idempotency_digest_and_queued_quota(sessions):
    a, b = _tenant_slide(sessions, "a"), _tenant_slide(sessions, "b")
    (first,) = _submit(sessions, a, idempotency_key="k", request_sha256="d1")
    assert _submit(sessions, a, idempotency_key="k", request_sha256="d1") == [first]
    with pytest.raises(IdempotencyConflictError):
        _submit(sessions, a, idempotency_key="k", request_sha256="d2")
    assert _submit(sessions, b, idempotency_key="k", request_sha256="d2") != [first]  # keys are per tenant
    _submit(sessions, a, 1, max_queued=2)
    with pytest.raises(QuotaExceededError, match="2 queued"):
        _submit(sessions, a, 1, max_queued=2)
    assert len(_submit(sessions, b, 1, max_queued=2)) == 1  # B is under its own quota
    with transaction(sessions) as s:
        assert s.query(Job).filter(Job.tenant_id == a[0]).count() == 2  # the refused submit recorded nothing


def test_identical_work_runs_once(sessions):
    """A second identical job follows the running one and succeeds with its result; a third, after it finished,
    is born succeeded; when a leader fails, its followers run themselves."""
    a = _tenant_slide(sessions, "a")
    (leader,) = _submit(sessions, a, cache_key="c1")
    (follower,) = _submit(sessions, a, cache_key="c1")
    (fresh,) = _submit(sessions, a, cache_key="c1", reuse=False)
    lease = _claim(sessions)
    assert lease.job_id == leader
    assert _claim(sessions).job_id == fresh  # a follower is never claimed
    assert _claim(sessions) is None
    files = {"result.json": {"key": f"results/t/{leader}/1/result.json", "size": 2, "sha256": "x"}}
    with transaction(sessions) as s:
        done = lifecycle.succeed(s, lease, files, {})
    assert done.won and done.followers_done == [follower]
    (late,) = _submit(sessions, a, cache_key="c1")
    with transaction(sessions) as s:
        f, g = s.get(Job, follower), s.get(Job, late)
        assert f.state == g.state == "succeeded" and f.options["reused_from"] == g.options["reused_from"] == leader
        assert repo.get_result(s, a[0], late).files == files
    (l2,) = _submit(sessions, a, cache_key="c2")
    (f2,) = _submit(sessions, a, cache_key="c2")
    lease2 = _claim(sessions)
    assert lease2.job_id == l2
    with transaction(sessions) as s:
        out = lifecycle.finish(s, lease2, "failed", error_code="corrupt_slide", error_message="bad")
    assert out.followers_released == [f2] and _claim(sessions).job_id == f2


def test_scratch_of_dead_processes_is_swept(tmp_path):
    work = tmp_path / "work"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    host = socket.gethostname()
    gone = work / f"job-{new_id()}-{host}-{pid}-abc123"
    live = work / f"{scratch_prefix(new_id())}xyz789"
    other_host = work / f"job-{new_id()}-elsewhere-{pid}-abc123"
    for p in (gone, live, other_host):
        (p / "sub").mkdir(parents=True)
    assert sweep_scratch(work) == 1
    assert not gone.exists() and live.exists() and other_host.exists()
    assert str(os.getpid()) in live.name


@pytest.fixture()
def small_disk(tmp_path):
    """A real 8 MiB filesystem (tmpfs), so a full disk is the kernel's ENOSPC, not a simulation."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_fails_the_job_with_storage_full_and_keeps_the_slide(small_disk, cmu_svs, tmp_path):
    """Slides, results and scratch on a disk that fills up mid-job; the job store elsewhere (PostgreSQL, or SQLite
    on another disk, as production runs it)."""
    import hashlib

    from service.config import Settings
    from service.jobs.execute import execute_job
    from service.jobs.resources import open_store

    settings = Settings(
        data_dir=small_disk, database_url=f"sqlite:///{tmp_path / 'jobs.db'}", pipeline="runner_pipelines:tiny"
    )
    store = open_store(settings)
    with transaction(store.sessions) as s:
        tenant = repo.ensure_tenant(s, "lab")
        slide = repo.new_slide(tenant.id, sha256="a" * 64, size_bytes=1, fmt="svs", mpp_override=None, info={})
        store.blobs.put_file(slide.blob_key, cmu_svs)
        s.add(slide)
    with transaction(store.sessions) as s:
        job_id = lifecycle.create(s, tenant_id=tenant.id, slide_id=slide.id, options={})[0].id
        lease = lifecycle.claim_fair(s, "w")
    before = hashlib.sha256(store.blobs.local_path(slide.blob_key).read_bytes()).hexdigest()
    filler = small_disk / "filler"
    with open(filler, "wb") as fh:  # leave almost nothing: the job's outputs cannot be written
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError:
            pass
    outcome = execute_job(lease, settings)
    with transaction(store.sessions) as s:
        job = s.get(Job, job_id)
        assert (outcome.state, job.state, job.error_code) == ("failed", "failed", "storage_full"), job.error_message
        assert "no space left" in job.error_message
    assert hashlib.sha256(store.blobs.local_path(slide.blob_key).read_bytes()).hexdigest() == before
    assert not list((small_disk / "blobs" / "results").rglob("*.*"))  # nothing half-published
    assert not list(settings.work_dir.glob("job-*"))
    filler.unlink()  # space again: the same slide analyses fine
    with transaction(store.sessions) as s:
        job_id = lifecycle.create(s, tenant_id=tenant.id, slide_id=slide.id, options={})[0].id
        lease = lifecycle.claim_fair(s, "w")
    assert execute_job(lease, settings).state == "succeeded"
    store.engine.dispose()
