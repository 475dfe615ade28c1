"""Engine and sessions: the same code path for SQLite (default, one machine) and PostgreSQL (production)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from service.store.models import Base


def make_engine(url: str) -> Engine:
    """An engine with the pragmas SQLite needs for several processes (WAL, busy timeout, foreign keys)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:
            # pysqlite's own transaction handling breaks SAVEPOINT and starts every transaction DEFERRED; a
            # deferred reader that then writes fails at once with "database is locked" when another process
            # wrote meanwhile (no busy wait on lock upgrade). We emit BEGIN ourselves (below).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn) -> None:
            immediate = conn.get_execution_options().get("sqlite_immediate")
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def init_db(engine: Engine) -> None:
    """Create missing tables (idempotent; several processes may race here at start-up)."""
    Base.metadata.create_all(engine)
    _add_new_columns(engine)


def _add_new_columns(engine: Engine) -> None:
    """`create_all` creates missing tables but not columns added to existing ones since: add those (nullable
    only), so an existing job database keeps working after an upgrade. A racing process may add one first."""
    insp = inspect(engine)
    for table in Base.metadata.sorted_tables:
        if not insp.has_table(table.name):
            continue
        have = {c["name"] for c in insp.get_columns(table.name)}
        for col in table.columns:
            if col.name in have or not col.nullable:
                continue
            ddl = f"ALTER TABLE {table.name} ADD COLUMN {col.name} {col.type.compile(engine.dialect)}"
            try:
                with engine.begin() as conn:
                    conn.exec_driver_sql(ddl)
                    if (table.name, col.name) == ("jobs", "webhook_claimed_at"):  # old rows were reported already
                        conn.exec_driver_sql("UPDATE jobs SET webhook_claimed_at = finished_at")
                    if (table.name, col.name) == ("jobs", "webhook_sent_at"):  # and their senders finished
                        conn.exec_driver_sql("UPDATE jobs SET webhook_sent_at = webhook_claimed_at")
            except DBAPIError:
                if col.name not in {c["name"] for c in inspect(engine).get_columns(table.name)}:
                    raise


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any exception.

    On SQLite it takes the write lock up front (BEGIN IMMEDIATE), so read-then-write units wait their turn
    (busy timeout) instead of failing; PostgreSQL ignores the option."""
    with factory() as session, session.begin():
        session.connection(execution_options={"sqlite_immediate": True})
        yield session


def ping(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
