"""Durable job records (SQLAlchemy: SQLite or PostgreSQL) and the blob store for slides and results."""

from service.store.blobs import BlobStore, FileBlobStore
from service.store.db import init_db, make_engine, session_factory, transaction
from service.store.models import JOB_STATES, TERMINAL_STATES, ApiKey, Job, Result, Slide, Tenant

__all__ = [
    "JOB_STATES",
    "TERMINAL_STATES",
    "ApiKey",
    "BlobStore",
    "FileBlobStore",
    "Job",
    "Result",
    "Slide",
    "Tenant",
    "init_db",
    "make_engine",
    "session_factory",
    "transaction",
]
