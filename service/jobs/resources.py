"""`open_store(settings)`: the job database and blob store, built once per process and shared by everything in it.

The gateway, each embedded worker process, each Celery pool child and `mstar submit` used to build their own
engines (some per job); a process now holds one `Store` per configuration. Forked children get their own,
because a pooled connection must never cross a fork.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.store.blobs import BlobStore, make_blob_store
from service.store.db import init_db, make_engine, session_factory


@dataclass(frozen=True)
class Store:
    engine: Engine
    sessions: sessionmaker[Session]
    blobs: BlobStore


_STORES: dict[tuple[int, str, str], Store] = {}
_LOCK = threading.Lock()


def open_store(settings: Settings) -> Store:
    """This process's store for `settings` (tables created on first use)."""
    key = (os.getpid(), settings.db_url, str(settings.blob_url or settings.blob_dir))
    with _LOCK:
        store = _STORES.get(key)
        if store is None:
            from service.store import batches  # noqa: F401  (registers the batch tables for init_db)

            engine = make_engine(settings.db_url)
            init_db(engine)
            store = Store(engine, session_factory(engine), make_blob_store(settings))
            _STORES[key] = store
        return store


def close_stores() -> None:
    """Dispose of this process's engines (tests, shutdown)."""
    with _LOCK:
        for key, store in list(_STORES.items()):
            if key[0] == os.getpid():
                store.engine.dispose()
            del _STORES[key]
