"""Logging for every process: plain text for people, or one JSON object per line for a log pipeline
(`MSTAR_LOG_FORMAT=json`). Both carry the request id, job id and tenant of the context that logged, and the
trace id when tracing is on, so a job's lines can be found across the gateway and its worker."""

from __future__ import annotations

import json
import logging
import time
from typing import Literal

from service.obs import context

_PLAIN = "%(asctime)s %(levelname)s %(name)s[%(process)d]%(ids)s %(message)s"


def _trace_id() -> str | None:
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


class ContextFilter(logging.Filter):
    """Adds `request_id`, `job_id`, `tenant` and `trace_id` to every record (None where unset) and `ids`, their
    plain-text rendering."""

    def filter(self, record: logging.LogRecord) -> bool:
        ids = context.current()
        trace_id = _trace_id()
        if trace_id:
            ids["trace_id"] = trace_id
        for name in ("request_id", "job_id", "tenant", "trace_id"):
            if not hasattr(record, name):
                setattr(record, name, ids.get(name))
        record.ids = "".join(f" {k}={v}" for k, v in ids.items())
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, process, message, the context ids and, for
    an exception, its type and traceback."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        for name in ("request_id", "job_id", "tenant", "trace_id"):
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exc_type"] = record.exc_info[0].__name__ if record.exc_info[0] else None
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure_logging(level: str = "info", fmt: Literal["plain", "json"] = "plain") -> None:
    """Install one stderr handler on the root logger (replacing earlier ones) with the context filter. Uvicorn's
    and Celery's own loggers propagate to it."""
    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(_PLAIN))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
