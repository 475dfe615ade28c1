"""The gateway's error handlers: an unexpected error is a 500 without details, except a full store, which is 507."""

from __future__ import annotations

import errno
import sqlite3

from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError

from service.api.errors import install_handlers


def test_a_write_refused_for_lack_of_space_is_507_anywhere_else_500() -> None:
    """A DELETE /slides on a full disk answered 500 internal_error (the SQLite commit failed), so a tenant could not
    tell that freeing space would help. Any request the store refuses for space is now 507 storage_full."""
    app = FastAPI()
    install_handlers(app)

    @app.delete("/disk")
    def disk() -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    @app.delete("/db")
    def db() -> None:
        raise OperationalError("DELETE FROM slides", {}, sqlite3.OperationalError("database or disk is full"))

    @app.delete("/bug")
    def bug() -> None:
        raise RuntimeError("secret detail")

    with TestClient(app, raise_server_exceptions=False) as c:
        for path in ("/disk", "/db"):
            r = c.delete(path)
            assert r.status_code == 507 and r.json()["error"]["code"] == "storage_full", r.text
        r = c.delete("/bug")
        assert r.status_code == 500 and r.json() == {
            "error": {"code": "internal_error", "message": "internal server error"}
        }
