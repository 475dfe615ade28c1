"""Alembic migrations of the job database: fresh, from before migrations with data, racing starts, append-only audit."""

from __future__ import annotations

import multiprocessing as mp

import pytest
from services import fresh_database, postgres_url  # noqa: F401  (postgres_url: the session fixture)
from sqlalchemy import inspect, text
from sqlalchemy.exc import DBAPIError

from service.store import batches  # noqa: F401  (the batch tables are part of the schema)
from service.store.db import init_db, make_engine, schema_revision, session_factory, transaction
from service.store.models import AuditEvent, Base, Job, Slide, Tenant


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    return fresh_database(request.getfixturevalue("postgres_url"), "mstar_migrations")


def test_head_matches_the_models(db_url):
    """What the migrations build is what the ORM models declare (nothing left to autogenerate)."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(db_url)
    init_db(engine)
    assert schema_revision(engine) == "0005"
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    engine.dispose()


def _seed(factory) -> str:
    with transaction(factory) as s:
        t = Tenant(name="acme")
        s.add(t)
        s.flush()
        sl = Slide(tenant_id=t.id, sha256="a" * 64, format="svs", size_bytes=1, blob_key="k", info={})
        s.add(sl)
        s.flush()
        job = Job(tenant_id=t.id, slide_id=sl.id, state="succeeded", options={"tasks": ["embedding"]})
        s.add(job)
        s.flush()
        return job.id


def test_an_old_database_with_data_is_upgraded(db_url):
    """A database at the baseline revision that holds a job: upgrading keeps the row and adds the new columns."""
    engine = make_engine(db_url)
    init_db(engine, revision="0001")
    assert not inspect(engine).has_table("audit_events")
    assert "trace_id" not in {c["name"] for c in inspect(engine).get_columns("jobs")}
    with engine.begin() as conn:  # rows written by the old release, through plain SQL (the old schema)
        conn.execute(text("INSERT INTO tenants (id, name, created_at) VALUES ('t1', 'acme', CURRENT_TIMESTAMP)"))
        conn.execute(
            text(
                "INSERT INTO slides (id, tenant_id, sha256, format, size_bytes, blob_key, info, created_at) "
                "VALUES ('s1', 't1', :sha, 'svs', 10, 'k', '{}', CURRENT_TIMESTAMP)"
            ),
            {"sha": "b" * 64},
        )
        conn.execute(
            text(
                "INSERT INTO jobs (id, tenant_id, slide_id, state, progress, attempts, options, cancel_requested, "
                "stage_seconds, created_at) VALUES ('j1', 't1', 's1', 'succeeded', 1.0, 1, '{}', false, "
                """'{"embed": 2.5}', CURRENT_TIMESTAMP)"""
            )
        )
    engine.dispose()
    engine = make_engine(db_url)
    init_db(engine)
    assert schema_revision(engine) == "0005"
    with session_factory(engine)() as s:
        job = s.get(Job, "j1")
        assert (
            job.state == "succeeded"
            and job.stage_seconds == {"embed": 2.5}
            and job.trace_id is None
            and job.trace_parent is None
        )
    engine.dispose()


def test_audit_rows_cannot_be_changed_or_removed(db_url):
    """Append-only in the database itself: UPDATE and DELETE (and TRUNCATE on PostgreSQL) are refused by triggers,
    on SQLite and PostgreSQL."""
    engine = make_engine(db_url)
    init_db(engine)
    factory = session_factory(engine)
    with transaction(factory) as s:
        ev = AuditEvent(tenant_id="t", action="read", resource="job", method="GET", route="/jobs/{job_id}", status=200)
        s.add(ev)
    refused = ["UPDATE audit_events SET action = 'delete'", "DELETE FROM audit_events"]
    if engine.dialect.name == "postgresql":  # SQLite has no TRUNCATE (its DELETE fires the trigger above)
        refused.append("TRUNCATE audit_events")
    for sql in refused:
        with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
            conn.execute(text(sql))
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*), min(action) FROM audit_events")).one() == (1, "read")
    engine.dispose()


def _init(url: str, q) -> None:
    try:
        engine = make_engine(url)
        init_db(engine)
        q.put(schema_revision(engine))
        engine.dispose()
    except Exception as err:  # reported to the parent, which fails the test
        q.put(repr(err))


def test_processes_starting_together_migrate_once(postgres_url):  # noqa: F811
    """Six processes run `init_db` on one empty PostgreSQL database at once: the advisory lock makes them take
    turns, so none fails on a table or type another one just created."""
    url = fresh_database(postgres_url, "mstar_migration_race")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_init, args=(url, q)) for _ in range(6)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert results == ["0005"] * 6
