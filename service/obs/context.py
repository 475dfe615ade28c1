"""The ids a log line carries without every call passing them: request id, job id and tenant id.

Context variables, so each request (an asyncio task, or the thread it hands work to) and each job sees its own.
Ids only: never file names, slide metadata or anything else that could identify a patient.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from contextvars import ContextVar

request_id: ContextVar[str | None] = ContextVar("mstar_request_id", default=None)
job_id: ContextVar[str | None] = ContextVar("mstar_job_id", default=None)
tenant: ContextVar[str | None] = ContextVar("mstar_tenant", default=None)

_VARS = {"request_id": request_id, "job_id": job_id, "tenant": tenant}
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def safe_request_id(value: str | None) -> str | None:
    """A client's `X-Request-Id` if it is a plain token (at most 64 of `A-Za-z0-9._:-`), else None: anything else
    could inject text into logs or carry data we must not store."""
    return value if value is not None and _SAFE_ID.match(value) else None


def bind_log_context(**values: str | None) -> None:
    """Set some of request_id / job_id / tenant for the rest of the current context."""
    for name, value in values.items():
        _VARS[name].set(value)


@contextlib.contextmanager
def log_context(**values: str | None) -> Iterator[None]:
    """Set ids for the duration of a block (a job run), restoring the previous ones after it."""
    tokens = [(_VARS[name], _VARS[name].set(value)) for name, value in values.items()]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def current() -> dict[str, str]:
    """The ids bound now (unset ones left out)."""
    return {name: v for name, var in _VARS.items() if (v := var.get()) is not None}
