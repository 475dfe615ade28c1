"""Alembic environment: `init_db` hands over an open connection (it holds the start-up lock), so this only
configures the context on it; the project has no alembic.ini and no online/offline URL handling."""

from __future__ import annotations

from alembic import context

from service.store.models import Base


def _run() -> None:
    connection = context.config.attributes["connection"]
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
    )
    with context.begin_transaction():
        context.run_migrations()


_run()
