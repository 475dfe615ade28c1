"""Typed refusals. Every error a user can cause maps to one class with a stable `code` and HTTP status.

The CLI prints `str(err)` on one line and exits non-zero; the API turns it into a 4xx JSON body;
a worker marks the job failed with `code` and the message. Nothing here should ever be a crash.
"""

from __future__ import annotations

import errno
from collections.abc import Callable


class MstarError(Exception):
    """Base of all expected, user-facing failures."""

    code: str = "error"
    http_status: int = 422

    def __init__(self, message: str, *, slide: str | None = None) -> None:
        self.slide = slide
        super().__init__(f"{slide}: {message}" if slide else message)


class SlideError(MstarError):
    code = "slide_error"


class SlideNotFoundError(SlideError):
    code = "slide_not_found"
    http_status = 404


class UnsupportedFormatError(SlideError):
    code = "unsupported_format"
    http_status = 415


class CorruptSlideError(SlideError):
    code = "corrupt_slide"
    http_status = 422


class MissingMppError(SlideError):
    code = "missing_mpp"
    http_status = 422


class SlideTooLargeError(SlideError):
    code = "slide_too_large"
    http_status = 413


class NoTissueError(SlideError):
    code = "no_tissue"
    http_status = 422


class InvalidParameterError(MstarError):
    code = "invalid_parameter"
    http_status = 422


class SourceNotAllowedError(MstarError):
    """A client named a source the deployment does not let clients read (another bucket, or the store itself)."""

    code = "source_not_allowed"
    http_status = 403


class BundleError(MstarError):
    """A model bundle that the service cannot serve (schema, checksum, missing file)."""

    code = "invalid_bundle"
    http_status = 500


class NonFiniteResultError(MstarError):
    """An analysis produced NaN or an infinity (an input beyond what the models take, a damaged model): the job fails
    naming the field rather than writing a result that strict JSON parsers refuse and that means nothing."""

    code = "non_finite_result"
    http_status = 422


class ResultDamagedError(MstarError):
    """A finished job's stored result file is missing or unreadable (storage lost or damaged it): the server's fault,
    said without its storage paths."""

    code = "result_damaged"
    http_status = 500


class BundleUnavailableError(MstarError):
    """The configured model bundle was refused when the service loaded it: analyses cannot run until it is fixed
    and reloaded, so they are refused at submit instead of failing one by one."""

    code = "bundle_unavailable"
    http_status = 503


class BackendUnavailableError(MstarError):
    """An inference backend (Triton server, GPU provider) that cannot be reached or started."""

    code = "backend_unavailable"
    http_status = 503


class JobTimeLimitError(MstarError):
    """A job ran past its time limit (a hung decoder, a slide far larger than planned) and was stopped."""

    code = "time_limit"
    http_status = 504


class StorageFullError(MstarError):
    """The slide or result store has no space left: nothing half-written is kept, nothing stored is lost."""

    code = "storage_full"
    http_status = 507


_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def is_disk_full(err: BaseException | None, *, also: Callable[[BaseException], bool] | None = None) -> bool:
    """An error that means "no space": an OSError with ENOSPC/EDQUOT/EFBIG (also when a library wrapped it as its
    cause), or one that `also` recognises (e.g. a database's own "disk is full"). Stops at a `StorageFullError`,
    which has already said so."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in _DISK_FULL:
            return True
        if also is not None and also(err):
            return True
        err = err.__cause__ or err.__context__
        if isinstance(err, StorageFullError):
            return False
    return False


class IdempotencyConflictError(MstarError):
    """An Idempotency-Key reused with a different request (the IETF draft's 422): the first job is not returned."""

    code = "idempotency_key_reused"
    http_status = 422


class QuotaExceededError(MstarError):
    """A tenant is over its share (queued jobs, concurrent uploads): retry later; other tenants are unaffected."""

    code = "quota_exceeded"
    http_status = 429


class ServiceBusyError(MstarError):
    """The whole service is at capacity for this kind of request: retry later."""

    code = "busy"
    http_status = 503
