"""Alembic migrations for the job database (run by `service.store.db.init_db`; see docs/service.md)."""
