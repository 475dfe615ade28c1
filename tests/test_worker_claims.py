"""Job-row guards of the distributed workers on a real (SQLite) job store, and the Celery settings they rely on."""

from __future__ import annotations

import json
import time
from datetime import timedelta

import pytest
from services import webhook_receiver

from service import webhooks
from service.config import Settings
from service.errors import InvalidParameterError
from service.jobs import lifecycle
from service.jobs.celery_app import BATCH, INTERACTIVE, PRIORITY, limits, make_celery, transport_options
from service.store import repo
from service.store.db import init_db, make_engine, session_factory, transaction
from service.store.models import Job, Slide, new_id, utcnow
from service.worker.tasks import worker_app


@pytest.fixture()
def sessions(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    init_db(engine)
    factory = session_factory(engine)
    yield factory
    engine.dispose()


def _job(factory, webhook_url: str | None = None, tenant: str = "lab") -> str:
    with transaction(factory) as s:
        tenant = repo.ensure_tenant(s, tenant)
        slide = Slide(
            id=new_id(),
            tenant_id=tenant.id,
            sha256=new_id() * 2,
            format="svs",
            size_bytes=1,
            blob_key="slides/x.svs",
            info={},
        )
        s.add(slide)
        s.flush()
        job, _ = lifecycle.create(s, tenant_id=tenant.id, slide_id=slide.id, options={}, webhook_url=webhook_url)
        return job.id


def _claim(factory, job_id, worker, max_attempts=2, lease_s=30.0, token=None):
    """One delivery of the token published for `job_id` (a redelivery carries the same token)."""
    with transaction(factory) as s:
        return lifecycle.claim_for_token(
            s, token or f"tok-{job_id}", worker, queue="interactive", max_attempts=max_attempts, lease_s=lease_s
        )


def _get(factory, job_id) -> Job:
    with transaction(factory) as s:
        return s.get(Job, job_id)


def test_claim_runs_once_and_a_duplicate_delivery_waits(sessions):
    job_id = _job(sessions)
    first = _claim(sessions, job_id, "a@h:1")
    assert (first.lease.job_id, first.lease.attempt) == (job_id, 1)
    dup = _claim(sessions, job_id, "b@h:2")  # the same token again, fresh heartbeat: its holder may be alive
    assert dup.lease is None and dup.wait and "running on a@h:1" in dup.why
    job = _get(sessions, job_id)
    assert (job.state, job.attempts, job.worker) == ("running", 1, "a@h:1")
    with transaction(sessions) as s:
        lifecycle.finish_unowned(s, job_id, "succeeded")
    late = _claim(sessions, job_id, "b@h:2")
    assert late.lease is None and not late.wait and late.why == "nothing queued"


def test_stale_lease_is_taken_over_then_attempts_run_out(sessions):
    job_id = _job(sessions)
    assert _claim(sessions, job_id, "a@h:1").lease.attempt == 1
    with transaction(sessions) as s:  # the whole worker died: no heartbeat since
        s.get(Job, job_id).heartbeat_at = utcnow() - timedelta(seconds=60)
    with transaction(sessions) as s:
        assert not lifecycle.heartbeat(s, lifecycle.Lease(job_id, "b@h:2", 1))  # not b's job
    take = _claim(sessions, job_id, "b@h:2")
    assert (take.lease.attempt, take.why) == (2, "taken over")
    with transaction(sessions) as s:
        assert not lifecycle.heartbeat(s, lifecycle.Lease(job_id, "a@h:1", 1))  # the old attempt lost its lease
        assert lifecycle.heartbeat(s, take.lease)
        s.get(Job, job_id).heartbeat_at = utcnow() - timedelta(seconds=60)
    out = _claim(sessions, job_id, "c@h:3")
    assert out.lease is None and out.why == "out of attempts"
    job = _get(sessions, job_id)
    assert (job.state, job.error_code) == ("failed", "worker_lost")


def test_a_lost_attempt_can_write_nothing(sessions):
    """Fencing: once attempt 2 owns the job, every write of attempt 1 (progress, result, verdict) is refused."""
    job_id = _job(sessions)
    old = _claim(sessions, job_id, "a@h:1").lease
    with transaction(sessions) as s:
        s.get(Job, job_id).heartbeat_at = utcnow() - timedelta(seconds=60)
    new = _claim(sessions, job_id, "b@h:2").lease
    with transaction(sessions) as s:
        assert not lifecycle.progress(s, old, "embed", 0.5, {})
        assert not lifecycle.still_owned(s, old) and lifecycle.still_owned(s, new)
        assert not lifecycle.finish(s, old, "failed", error_code="x", error_message="x").won
        assert not lifecycle.succeed(s, old, {"result.json": {"key": "k1"}}, {}).won
        assert lifecycle.succeed(s, new, {"result.json": {"key": "k2"}}, {}).won
        assert not lifecycle.finish(s, old, "canceled", error_code="canceled").won
    job = _get(sessions, job_id)
    with transaction(sessions) as s:
        files = repo.get_result(s, job.tenant_id, job_id).files
    assert job.state == "succeeded" and files == {"result.json": {"key": "k2"}}
    assert lifecycle.result_prefix("t", job_id, 1) != lifecycle.result_prefix("t", job_id, 2)


def test_child_lost_requeues_then_fails_with_reason(sessions):
    job_id = _job(sessions)
    _claim(sessions, job_id, "a@h:1")
    with transaction(sessions) as s:
        assert lifecycle.on_child_lost(s, "other@h:9", max_attempts=2, why="signal 6") == ("ignored", None)
        assert lifecycle.on_child_lost(s, "a@h:1", max_attempts=2, why="signal 6 (SIGABRT)") == ("requeued", job_id)
    assert _get(sessions, job_id).state == "queued"
    assert _claim(sessions, job_id, "a@h:2").lease.attempt == 2  # the redelivered token claims it again
    with transaction(sessions) as s:
        assert lifecycle.on_child_lost(s, "a@h:2", max_attempts=2, why="signal 6 (SIGABRT)") == ("failed", job_id)
    job = _get(sessions, job_id)
    assert job.state == "failed" and job.error_code == "worker_crashed" and "SIGABRT" in job.error_message


def test_hard_timeout_fails_only_the_owners_job(sessions):
    job_id = _job(sessions)
    _claim(sessions, job_id, "a@h:1")
    with transaction(sessions) as s:
        assert lifecycle.on_hard_timeout(s, "b@h:2", 8) == (False, None)
        assert lifecycle.on_hard_timeout(s, "a@h:1", 8) == (True, job_id)
    job = _get(sessions, job_id)
    assert job.error_code == "time_limit" and "8 s" in job.error_message


def test_canceled_before_delivery_is_not_run(sessions):
    job_id = _job(sessions)
    with transaction(sessions) as s:
        lifecycle.request_cancel(s, s.get(Job, job_id))
    assert _claim(sessions, job_id, "a@h:1").lease is None
    assert _get(sessions, job_id).state == "canceled"


def test_limits_and_reliability_settings(tmp_path):
    s = Settings(
        data_dir=tmp_path, broker_url="redis://127.0.0.1:1/0", task_time_limit_s=100, worker_max_memory_mb=2048
    )
    soft, hard, vis = limits(s)
    assert soft == 90 and hard == 100 and vis == 170
    opts = transport_options(s)
    assert opts["visibility_timeout"] > hard and opts["unacked_restore_throttle"] == 1
    assert opts["queue_order_strategy"] == "priority" and opts["unacked_mutex_expire"] < 300
    with pytest.raises(InvalidParameterError, match="must exceed"):
        limits(Settings(data_dir=tmp_path, task_time_limit_s=100, broker_visibility_timeout_s=50))
    with pytest.raises(InvalidParameterError, match="below"):
        limits(Settings(data_dir=tmp_path, task_time_limit_s=100, task_soft_time_limit_s=120))
    app = worker_app(s)
    conf = app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    assert conf.task_ignore_result and "mstar.run_job" in app.tasks
    assert conf.task_time_limit == 100 and conf.task_soft_time_limit == 90
    assert conf.worker_max_memory_per_child == 2048 * 1024  # KiB
    assert PRIORITY[INTERACTIVE] < PRIORITY[BATCH]  # Redis serves lower numbers first
    with pytest.raises(InvalidParameterError, match="no broker"):
        make_celery(Settings(data_dir=tmp_path))


def test_reaper_requeues_silent_jobs_and_fails_exhausted_ones(sessions):
    fresh, silent, exhausted = _job(sessions), _job(sessions), _job(sessions)
    for job_id in (fresh, silent, exhausted):
        _claim(sessions, job_id, "a@h:1")
    with transaction(sessions) as s:
        s.get(Job, silent).heartbeat_at = utcnow() - timedelta(seconds=61)
        gone = s.get(Job, exhausted)
        gone.heartbeat_at, gone.attempts = utcnow() - timedelta(seconds=61), 2
    with transaction(sessions) as s:
        reaped = lifecycle.reap_stale(s, lease_s=30, max_attempts=2)
    assert (reaped.requeued, reaped.failed) == ([silent], [exhausted])
    assert [_get(sessions, j).state for j in (fresh, silent, exhausted)] == ["running", "queued", "failed"]
    assert _get(sessions, exhausted).error_code == "worker_lost"


def test_a_verdict_lands_only_on_the_attempt_it_was_about(sessions):
    """A pool master's verdict for attempt 1 is void once a redelivery took the job over (attempt 2)."""
    job_id = _job(sessions)
    _claim(sessions, job_id, "a@h:1")
    with transaction(sessions) as s:
        stale = s.get(Job, job_id)
        stale.heartbeat_at = utcnow() - timedelta(seconds=60)
    assert _claim(sessions, job_id, "a@h:1").lease.attempt == 2  # same worker tag, a new attempt
    with transaction(sessions) as s:
        assert lifecycle.fail_running(s, job_id, attempts=1, worker="a@h:1", code="time_limit", message="x") is False
        assert lifecycle.fail_running(s, job_id, attempts=2, worker="a@h:1", code="time_limit", message="x") is True
        assert lifecycle.fail_running(s, job_id, attempts=2, worker="a@h:1", code="time_limit", message="x") is False
    assert _get(sessions, job_id).state == "failed"


def test_terminal_webhook_is_claimed_once(sessions):
    job_id, silent = _job(sessions, "http://127.0.0.1:9/hook"), _job(sessions)
    _claim(sessions, job_id, "a@h:1")
    with transaction(sessions) as s:
        assert webhooks.claim(s, job_id) is None  # not terminal yet
        assert lifecycle.on_hard_timeout(s, "a@h:1", 8)[0]
    with transaction(sessions) as s:
        got = webhooks.claim(s, job_id)
    assert got.url == "http://127.0.0.1:9/hook" and got.payload["state"] == "failed"
    assert got.payload["error"]["code"] == "time_limit" and "8 s" in got.payload["error"]["message"]
    with transaction(sessions) as s:
        assert webhooks.claim(s, job_id) is None  # the second caller gets nothing
        assert webhooks.claim(s, job_id, lease_s=60) is None  # nor does one that would take over a dead sender
        lifecycle.finish_unowned(s, silent, "canceled", error_code="canceled", error_message="canceled by request")
        assert webhooks.claim(s, silent) is None  # no webhook_url: nothing to claim
    assert _get(sessions, job_id).webhook_claimed_at is not None


def test_gateway_sweep_reports_reaped_and_senderless_endings_once(sessions, tmp_path):
    """The gateway's sweep fails an exhausted silent job and sends its webhook; a queued job canceled through
    the API (no worker involved) gets its webhook too; a second sweep sends nothing more."""
    from service.jobs.celery_queue import CeleryQueue

    with webhook_receiver() as (url, got):
        exhausted, canceled = _job(sessions, url), _job(sessions, url)
        _claim(sessions, exhausted, "a@h:1", max_attempts=1)
        with transaction(sessions) as s:
            s.get(Job, exhausted).heartbeat_at = utcnow() - timedelta(seconds=10)
            lifecycle.request_cancel(s, s.get(Job, canceled))
            s.get(Job, canceled).finished_at = utcnow() - timedelta(seconds=2)  # settled for more than a lease
        settings = Settings(
            data_dir=tmp_path,
            broker_url="redis://127.0.0.1:1/0",  # never contacted: nothing is re-published here
            worker_lease_s=1,
            job_max_attempts=1,
            webhook_secret="whsec-sweep",
            webhook_allow_private=True,
        )
        queue = CeleryQueue(settings)
        try:
            assert queue.sweep(sessions).failed == [exhausted]
            deadline = time.monotonic() + 10
            while len(got) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            queue.sweep(sessions)
            time.sleep(0.5)
        finally:
            queue.stop()
    got = {json.loads(body)["job_id"]: (headers, json.loads(body)) for headers, body in got}
    assert len(got) == 2 and set(got) == {exhausted, canceled}
    headers, body = got[exhausted]
    assert body["state"] == "failed" and body["error"]["code"] == "worker_lost"
    raw = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
    assert webhooks.verify("whsec-sweep", headers[webhooks.TIMESTAMP_HEADER], raw, headers[webhooks.SIGNATURE_HEADER])
    assert got[canceled][1]["state"] == "canceled"


def test_a_sender_that_died_mid_delivery_is_taken_over_once(sessions, tmp_path):
    """A claim that never finished (its process died between the claim and the POST) is re-sent by the sweep
    once the claim lease has passed, with the same event id; a fresh unfinished claim and a finished one are
    left alone, and the outcome is recorded against the claim that sent it."""
    from service.jobs.celery_queue import CeleryQueue

    settings = Settings(
        data_dir=tmp_path,
        broker_url="redis://127.0.0.1:1/0",  # never contacted
        worker_lease_s=1,
        webhook_allow_private=True,
        webhook_timeout_s=2,
        webhook_max_attempts=2,
        webhook_backoff_s=0.1,
    )
    lease = webhooks.claim_lease_s(settings)
    assert lease == 2 * 2 + 0.1 + webhooks.CLAIM_GRACE_S
    with webhook_receiver() as (url, got):
        dead, busy, done = _job(sessions, url), _job(sessions, url), _job(sessions, url)
        claims = {}
        with transaction(sessions) as s:
            for job_id in (dead, busy, done):
                lifecycle.finish_unowned(s, job_id, "succeeded")
                s.get(Job, job_id).finished_at = utcnow() - timedelta(seconds=5)
        with transaction(sessions) as s:
            for job_id in (dead, busy, done):
                claims[job_id] = webhooks.claim(s, job_id)
            s.get(Job, dead).webhook_claimed_at = utcnow() - timedelta(seconds=lease + 1)
            s.get(Job, done).webhook_claimed_at = utcnow() - timedelta(seconds=lease + 1)
            assert webhooks.record(s, done, s.get(Job, done).webhook_claimed_at, delivered=False)
            assert not webhooks.record(s, busy, utcnow(), delivered=True)  # not its claim: nothing recorded
        with transaction(sessions) as s:
            assert lifecycle.unreported(s, settled_s=1, window_s=3600) == []  # without a lease: never claimed only
            assert lifecycle.unreported(s, settled_s=1, window_s=3600, reclaim_after_s=lease) == [dead]
        queue = CeleryQueue(settings)
        try:
            queue.sweep(sessions)
            deadline = time.monotonic() + 10
            while _get(sessions, dead).webhook_sent_at is None and time.monotonic() < deadline:
                time.sleep(0.05)
            queue.sweep(sessions)
            time.sleep(0.3)
        finally:
            queue.stop()
    assert len(got) == 1
    headers, body = got[0]
    assert json.loads(body)["job_id"] == dead and headers[webhooks.EVENT_ID_HEADER] == f"{dead}.succeeded"
    taken = _get(sessions, dead)
    assert taken.webhook_delivered is True and taken.webhook_sent_at is not None
    with transaction(sessions) as s:  # the dead sender, had it come back, records nothing over the takeover
        assert not webhooks.record(s, dead, claims[dead].claimed_at, delivered=False)
    assert _get(sessions, dead).webhook_delivered is True
    assert _get(sessions, busy).webhook_sent_at is None and _get(sessions, done).webhook_delivered is False


def test_an_older_job_database_gets_the_new_columns(tmp_path):
    """A database from before migrations (no `alembic_version`), whose jobs table predates `published_at`, the
    webhook columns and `trace_id`: `init_db` upgrades it in place, its rows survive, and jobs that had already
    ended count as reported by a sender that finished (an upgrade sends no old webhook again)."""
    from sqlalchemy import inspect

    from service.store.db import schema_revision

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = make_engine(url)
    init_db(engine)
    factory = session_factory(engine)
    done, waiting = _job(factory, "http://127.0.0.1:9/h"), _job(factory, "http://127.0.0.1:9/h")
    with transaction(factory) as s:
        lifecycle.finish_unowned(s, done, "succeeded")
    with engine.begin() as conn:  # back to the shape `create_all` gave an older release
        conn.exec_driver_sql("DROP TABLE alembic_version")
        conn.exec_driver_sql("DROP TABLE audit_events")
        conn.exec_driver_sql("DROP TABLE upload_keys")
        conn.exec_driver_sql("DROP INDEX ix_jobs_tenant_started")
        old = ("published_at", "webhook_claimed_at", "webhook_sent_at", "webhook_delivered", "trace_id", "trace_parent")
        for col in old:
            conn.exec_driver_sql(f"ALTER TABLE jobs DROP COLUMN {col}")
    engine.dispose()
    engine = make_engine(url)
    assert schema_revision(engine) is None
    init_db(engine)
    init_db(engine)  # idempotent
    assert schema_revision(engine) == "0005"
    columns = {c["name"] for c in inspect(engine).get_columns("jobs")}
    assert {"published_at", "webhook_claimed_at", "trace_id", "trace_parent"} <= columns
    assert inspect(engine).has_table("audit_events") and inspect(engine).has_table("upload_keys")
    assert "ix_jobs_tenant_started" in {i["name"] for i in inspect(engine).get_indexes("jobs")}
    factory = session_factory(engine)
    finished, queued = _get(factory, done), _get(factory, waiting)
    assert finished.state == "succeeded" and queued.state == "queued"  # the rows survived
    assert finished.webhook_claimed_at == finished.finished_at and queued.webhook_claimed_at is None
    assert finished.webhook_sent_at == finished.finished_at and queued.webhook_sent_at is None
    assert queued.published_at is None and queued.trace_id is None
    engine.dispose()
    engine = make_engine(url)
    init_db(engine)
    init_db(engine)  # idempotent
    assert {"published_at", "webhook_claimed_at"} <= {c["name"] for c in inspect(engine).get_columns("jobs")}
    factory = session_factory(engine)
    finished, queued = _get(factory, done), _get(factory, waiting)
    assert finished.webhook_claimed_at == finished.finished_at and queued.webhook_claimed_at is None
    assert finished.webhook_sent_at == finished.finished_at and queued.webhook_sent_at is None
    assert queued.published_at is None
    engine.dispose()


def test_webhooks_of_a_tenant_with_hanging_receivers_never_delay_another_tenant(sessions):
    """One tenant's receivers that hang held the senders for a minute each: on a Celery worker the delivery ran on
    the job slot (every tenant's next job waited), and the embedded runner's two shared sender threads kept
    every other tenant's webhooks waiting. `Deliveries` keeps a queue per tenant and runs at most `per_tenant`
    of a tenant's at once, so the other tenant's webhook leaves at once and the hanging tenant uses two senders."""
    import http.server
    import threading

    release, lock, seen = threading.Event(), threading.Lock(), {"now": 0, "max": 0}

    class Hangs(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            with lock:
                seen["now"] += 1
                seen["max"] = max(seen["max"], seen["now"])
            release.wait(20)
            with lock:
                seen["now"] -= 1
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hangs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings = Settings(webhook_allow_private=True, webhook_timeout_s=30.0, webhook_max_attempts=1)

    def ended(tenant: str, url: str) -> str:
        job_id = _job(sessions, url, tenant=tenant)
        with transaction(sessions) as s:
            lifecycle.finish_unowned(s, job_id, "canceled", error_code="canceled", error_message="canceled")
        return job_id

    deliveries = webhooks.Deliveries(sessions, settings, threads=4, per_tenant=2)
    try:
        with webhook_receiver() as (fast_url, got):
            slow = [ended("slow-lab", f"http://127.0.0.1:{server.server_port}/hook") for _ in range(5)]
            for job_id in slow:
                deliveries.submit(job_id)
            time.sleep(0.3)
            fast = ended("fast-lab", fast_url)
            t0 = time.monotonic()
            deliveries.submit(fast)
            while not got and time.monotonic() - t0 < 10:
                time.sleep(0.02)
            waited = time.monotonic() - t0
            assert got and json.loads(got[0][1])["job_id"] == fast and waited < 2.0, waited
            assert seen["max"] == 2  # the hanging tenant holds two senders, never all four
            release.set()
            deadline = time.monotonic() + 15
            while deliveries.pending() and time.monotonic() < deadline:
                time.sleep(0.05)
        assert all(_get(sessions, j).webhook_delivered for j in [*slow, fast])
    finally:
        release.set()
        deliveries.close()
        server.shutdown()
        server.server_close()


def test_a_tenant_s_batch_never_counts_against_its_interactive_quota(sessions):
    """Batch jobs never ask for the queued quota, but they counted against it: a tenant with a large batch queued
    had every interactive upload refused with 429. Each queue now counts its own."""
    from service.errors import QuotaExceededError

    with transaction(sessions) as s:
        tenant = repo.ensure_tenant(s, "lab")
        slide = Slide(
            id=new_id(), tenant_id=tenant.id, sha256="b" * 64, format="svs", size_bytes=1, blob_key="k", info={}
        )
        s.add(slide)
        s.flush()
        for i in range(3):
            lifecycle.create(s, tenant_id=tenant.id, slide_id=slide.id, options={"batch_id": "b1", "line": i})
        for i in range(2):
            lifecycle.create(s, tenant_id=tenant.id, slide_id=slide.id, options={"i": i}, max_queued=2)
        with pytest.raises(QuotaExceededError, match="already has 2 queued interactive jobs"):
            lifecycle.create(s, tenant_id=tenant.id, slide_id=slide.id, options={"i": 9}, max_queued=2)
