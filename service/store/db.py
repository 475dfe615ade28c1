"""Engine and sessions: the same code path for SQLite (default, one machine) and PostgreSQL (production)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker


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


#: the key of the PostgreSQL advisory lock that serialises migrations of processes starting together
_MIGRATION_LOCK = 0x6D535441  # "mSTA"
_MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration for the job database (no alembic.ini: the script folder ships in the package)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def init_db(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to `revision` with Alembic (idempotent). A database from before migrations keeps its rows:
    the baseline revision adds only what it lacks. Processes starting together take turns: one transaction holds
    a PostgreSQL advisory lock (SQLite: the write lock, BEGIN IMMEDIATE) around reading the version and migrating,
    so the second one finds the work done."""
    with engine.connect().execution_options(sqlite_immediate=True) as conn, conn.begin():
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
        command.upgrade(alembic_config(conn), revision)


def schema_revision(engine: Engine) -> str | None:
    """The revision the database is at (None: never migrated)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


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


def db_full(err: BaseException) -> bool:
    """A job store write refused for lack of space (SQLite and PostgreSQL word it differently)."""
    if not isinstance(err, DBAPIError):
        return False
    text = str(err.orig).lower()
    return "disk is full" in text or "no space left" in text or "could not extend file" in text
