"""A full disk is a typed refusal (507 `storage_full`), never a bare internal error.

Every step of ingest that writes (staging an upload, unpacking a ZIP series, committing into the store) runs
inside `disk_full_as_error`; the caller's own cleanup (writers discarded, unpack folders removed) still runs
because the `StorageFullError` propagates through the same `except`/`finally` blocks as any failure."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from service.errors import StorageFullError, is_disk_full


@contextmanager
def disk_full_as_error(what: str) -> Iterator[None]:
    """Turn "no space left" inside the block into `StorageFullError` naming `what` was being written."""
    try:
        yield
    except StorageFullError:
        raise
    except OSError as err:
        if is_disk_full(err):
            raise StorageFullError(
                f"the slide store has no space left while {what}; nothing was stored, retry when space is freed"
            ) from None
        raise
