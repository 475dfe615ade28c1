"""Job store and blob store: the same repository code against SQLite and a real PostgreSQL server."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from services import postgres_url  # noqa: F401  (session fixture: a real PostgreSQL server)
from sqlalchemy import text

from service.jobs import lifecycle
from service.store import repo
from service.store.blobs import FileBlobStore
from service.store.db import init_db, make_engine, session_factory, transaction
from service.store.models import Job, Slide, new_id


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request, tmp_path: Path):
    sqlite = f"sqlite:///{tmp_path / 'jobs.db'}"
    url = sqlite if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    engine = make_engine(url)
    init_db(engine)
    if request.param == "postgresql":  # one server for the session: start each test from empty tables
        with engine.begin() as conn:
            conn.execute(text("TRUNCATE results, jobs, slides, api_keys, tenants CASCADE"))
    yield session_factory(engine)
    engine.dispose()


def _slide(tenant_id: str, sha: str = "ab" * 32) -> Slide:
    return Slide(
        id=new_id(),
        tenant_id=tenant_id,
        sha256=sha,
        format="svs",
        size_bytes=10,
        blob_key=f"slides/{tenant_id}/x.svs",
        info={},
    )


def test_api_keys_are_hashed_and_checked(sessions) -> None:
    with transaction(sessions) as s:
        token = repo.create_api_key(s, "lab-a")
        admin = repo.create_api_key(s, "lab-a", admin=True)
        repo.install_api_key(s, "lab-b", "bootstrap-key-0123456789")
        repo.install_api_key(s, "lab-b", "bootstrap-key-0123456789")  # idempotent
    with transaction(sessions) as s:
        stored = s.execute(text("SELECT secret_sha256 FROM api_keys")).scalars().all()
        assert token not in " ".join(stored) and len(stored) == 3
        tenant, is_admin = repo.authenticate(s, token)
        assert tenant.name == "lab-a" and not is_admin
        assert repo.authenticate(s, admin)[1] is True
        assert repo.authenticate(s, "bootstrap-key-0123456789")[0].name == "lab-b"
        assert repo.authenticate(s, token[:-1] + ("x" if token[-1] != "x" else "y")) is None
        assert repo.authenticate(s, "") is None
        assert repo.authenticate(s, "mstar_000000000000_" + "a" * 40) is None
    with pytest.raises(ValueError), transaction(sessions) as s:
        repo.install_api_key(s, "lab-c", "short")


def test_slides_are_scoped_and_deduplicated_per_tenant(sessions) -> None:
    with transaction(sessions) as s:
        a, b = repo.ensure_tenant(s, "a"), repo.ensure_tenant(s, "b")
        first = repo.add_slide(s, _slide(a.id))
        again = repo.add_slide(s, _slide(a.id))  # same bytes, same tenant: the first row comes back
        other = repo.add_slide(s, _slide(b.id))  # same bytes, other tenant: its own row
        assert again.id == first.id and other.id != first.id
        assert repo.get_slide(s, a.id, first.id) is not None
        assert repo.get_slide(s, b.id, first.id) is None
        rows, total = repo.list_slides(s, a.id, limit=10, offset=0)
        assert total == 1 and [r.id for r in rows] == [first.id]


def test_idempotency_key_returns_the_same_job(sessions) -> None:
    with transaction(sessions) as s:
        t = repo.ensure_tenant(s, "a")
        u = repo.ensure_tenant(s, "b")
        slide = repo.add_slide(s, _slide(t.id))
        j1, c1 = lifecycle.create(s, tenant_id=t.id, slide_id=slide.id, options={}, idempotency_key="k1")
        j2, c2 = lifecycle.create(s, tenant_id=t.id, slide_id=slide.id, options={}, idempotency_key="k1")
        j3, c3 = lifecycle.create(s, tenant_id=t.id, slide_id=slide.id, options={})
        other = repo.add_slide(s, _slide(u.id))
        j4, c4 = lifecycle.create(s, tenant_id=u.id, slide_id=other.id, options={}, idempotency_key="k1")
    assert (c1, c2, c3, c4) == (True, False, True, True)
    assert j1.id == j2.id and j3.id != j1.id and j4.id != j1.id


def _claim(s, worker: str) -> str | None:
    lease = lifecycle.claim_fair(s, worker)
    return lease.job_id if lease is not None else None


def test_concurrent_claims_never_share_a_job(sessions) -> None:
    with transaction(sessions) as s:
        t = repo.ensure_tenant(s, "a")
        slide = repo.add_slide(s, _slide(t.id))
        ids = {lifecycle.create(s, tenant_id=t.id, slide_id=slide.id, options={})[0].id for _ in range(20)}
    claimed: list[str] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        while True:
            with transaction(sessions) as s:
                job_id = _claim(s, f"w{n}")
            if job_id is None:
                return
            with lock:
                claimed.append(job_id)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert sorted(claimed) == sorted(ids)  # every job exactly once
    with transaction(sessions) as s:
        assert lifecycle.count_by_state(s)["running"] == 20
        assert all(j.attempts == 1 for j in s.query(Job).all())


def test_cancel_and_recovery_state_machine(sessions) -> None:
    with transaction(sessions) as s:
        t = repo.ensure_tenant(s, "a")
        slide = repo.add_slide(s, _slide(t.id))
        queued, _ = lifecycle.create(s, tenant_id=t.id, slide_id=slide.id, options={})
        mk = [lifecycle.create(s, tenant_id=t.id, slide_id=slide.id, options={})[0] for _ in range(3)]
    with transaction(sessions) as s:
        assert lifecycle.request_cancel(s, s.get(Job, queued.id))[0].state == "canceled"
        running = [_claim(s, "w") for _ in range(3)]
        assert set(running) == {j.id for j in mk}
        lifecycle.request_cancel(s, s.get(Job, running[0]))  # running: only flagged
        assert s.get(Job, running[0]).state == "running" and lifecycle.cancel_requested(s, running[0])
        s.get(Job, running[1]).attempts = 2  # out of attempts
    with transaction(sessions) as s:
        out = lifecycle.recover_orphans(s, max_attempts=2)
    assert out == {"requeued": 1, "failed": 1, "canceled": 1}
    with transaction(sessions) as s:
        assert s.get(Job, running[0]).state == "canceled"
        assert s.get(Job, running[1]).state == "failed" and s.get(Job, running[1]).error_code == "worker_lost"
        assert s.get(Job, running[2]).state == "queued"
        assert lifecycle.cancel_requested(s, "no-such-job")  # a deleted job stops its worker
        with pytest.raises(ValueError):
            lifecycle.finish_unowned(s, running[2], "running")


def test_cancel_of_a_job_claimed_meanwhile_flags_it(sessions, request) -> None:
    """The API read the job as queued, a worker claimed it before the cancel's update: the flag must still land."""
    if request.node.callspec.params["sessions"] == "sqlite":
        pytest.skip("a SQLite transaction holds the write lock from its start, so this interleaving cannot happen")
    with transaction(sessions) as s:
        t = repo.ensure_tenant(s, "a")
        slide = repo.add_slide(s, _slide(t.id))
        job, _ = lifecycle.create(s, tenant_id=t.id, slide_id=slide.id, options={})
    with transaction(sessions) as api:
        stale = api.get(Job, job.id)
        assert stale.state == "queued"
        with transaction(sessions) as worker:
            assert _claim(worker, "w") == job.id
        out, _ = lifecycle.request_cancel(api, stale)
        assert out.state == "running"
    with transaction(sessions) as s:
        assert lifecycle.cancel_requested(s, job.id)


def test_delete_slide_removes_jobs_and_results(sessions) -> None:
    with transaction(sessions) as s:
        t = repo.ensure_tenant(s, "a")
        slide = repo.add_slide(s, _slide(t.id))
        job, _ = lifecycle.create(s, tenant_id=t.id, slide_id=slide.id, options={})
    with transaction(sessions) as s:
        lease = lifecycle.claim_fair(s, "w")
        assert lifecycle.succeed(s, lease, {"result.json": {"key": "k", "size": 1, "sha256": "0"}}, {}).won
    with transaction(sessions) as s:
        assert repo.get_result(s, t.id, job.id) is not None
        assert repo.delete_slide(s, repo.get_slide(s, t.id, slide.id)) == [job.id]
    with transaction(sessions) as s:
        assert repo.get_job(s, t.id, job.id) is None and repo.get_result(s, t.id, job.id) is None


def test_blob_store_writes_atomically_and_refuses_traversal(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path / "blobs")
    w = store.writer()
    w.write(b"hello ")
    w.write(b"world")
    assert w.size == 11 and len(w.sha256) == 64
    assert not store.exists("slides/t/a.svs")  # nothing visible before commit
    w.commit("slides/t/a.svs")
    with store.open("slides/t/a.svs") as fh:
        assert fh.read() == b"hello world"
    assert [p.name for p in store.files()] == ["a.svs"]
    w2 = store.writer()
    w2.write(b"x")
    w2.discard()
    assert not list(store.staging.iterdir())
    for bad in ("../etc/passwd", "/abs", "a/../../b", "a//b", ""):
        with pytest.raises(ValueError):
            store.exists(bad)
    (store.root / "results").mkdir()
    (store.root / "results" / "half.part").write_bytes(b"partial")
    assert store.sweep_partials() == 1
    store.delete_prefix("slides/t")
    assert list(store.files()) == []
