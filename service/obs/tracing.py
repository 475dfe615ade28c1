"""OpenTelemetry tracing, off unless configured by the standard variables (`OTEL_EXPORTER_OTLP_ENDPOINT`,
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_TRACES_EXPORTER=otlp`; `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`
and the exporter's own settings are honoured by the SDK).

One trace follows an analysis: the gateway's request span (FastAPI's own telemetry), the Celery publish, whose
context travels in the message headers (Celery instrumentation), the worker's task span, then `mstar.job` and one
span per pipeline stage, with each model backend call inside its stage. The trace id is stored on the job
(`jobs.trace_id`) and returned by `GET /jobs/{id}`. In embedded mode (`service.jobs.embedded`) no message carries
the context to the worker processes, so the submitting span's W3C traceparent is stored with the job
(`jobs.trace_parent`) and the worker's `mstar.job` span starts as its child. Spans carry ids only, never file
names or slide metadata.

Everything here is a no-op when the SDK is not installed or tracing is not configured.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("mstar.tracing")
_LOCK = threading.Lock()
_STATE: dict[str, Any] = {"pid": None, "celery": False}


def configured() -> bool:
    """Whether the environment asks for traces."""
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none" or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    return bool(
        exporter
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def setup(service_name: str, *, processor: Any = None) -> bool:
    """Install this process's tracer provider once (again after a fork: the export thread does not survive it).
    `processor` replaces the OTLP exporter (tests pass an in-memory one). Returns whether tracing is on."""
    with _LOCK:
        if _STATE["pid"] == os.getpid():
            return True
        if processor is None and not configured():
            return False
        try:
            from opentelemetry import trace
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError:
            log.warning("OTEL_* is set but the opentelemetry SDK is not installed: no traces")
            return False
        if processor is None and not isinstance(trace.get_tracer_provider(), TracerProvider):
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            processor = BatchSpanProcessor(OTLPSpanExporter())
        current = trace.get_tracer_provider()
        if not isinstance(current, TracerProvider):  # else a forked child: the inherited processor restarts itself
            service = os.environ.get("OTEL_SERVICE_NAME") or service_name
            provider = TracerProvider(resource=Resource.create({"service.name": service}))
            provider.add_span_processor(processor)
            trace.set_tracer_provider(provider)
        elif processor is not None:  # the global provider is set once per process: a later test's exporter joins it
            current.add_span_processor(processor)
        _STATE["pid"] = os.getpid()
        return True


def disable() -> None:
    """Stop making spans in this process (the provider stays installed; apps created later are not instrumented)."""
    with _LOCK:
        _STATE["pid"] = None


def enabled() -> bool:
    return _STATE["pid"] is not None


_UNTRACED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def fastapi_telemetry() -> dict[str, Any]:
    """Settings for FastAPI's own OpenTelemetry support (`FastAPI(telemetry=...)`), which makes the server span
    of each request once `setup` has installed a tracer provider. (opentelemetry-instrumentation-fastapi refuses
    the gateway's middleware stack, whose outermost layer is `JsonTooLarge`, and would only log an error.) Probes
    and scrapes are left out, as they would drown the traces; no OpenTelemetry logs or metrics: the service has
    its JSON logs and Prometheus metrics, and an exception message in a log record may carry what a client sent."""
    return {"exclude": _untraced, "logs": False, "metrics": False}


def _untraced(scope: Any) -> bool:
    """FastAPI traces whenever a provider is installed: also after `disable`, unless told here."""
    return not enabled() or scope.get("path") in _UNTRACED_PATHS


def instrument_celery() -> None:
    """Publish spans (context injected in the message headers) and task spans (context extracted), once."""
    with _LOCK:
        if _STATE["celery"]:
            return
        from opentelemetry.instrumentation.celery import CeleryInstrumentor

        CeleryInstrumentor().instrument()
        _STATE["celery"] = True


def current_trace_id() -> str | None:
    """The 32-hex-digit id of the trace being recorded now, or None."""
    if not enabled():
        return None
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid and ctx.trace_flags.sampled else None


def current_traceparent() -> str | None:
    """The W3C `traceparent` of the span being recorded now (what a process without message headers needs to
    continue the trace), or None."""
    if current_trace_id() is None:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return carrier.get("traceparent")


@contextlib.contextmanager
def span(name: str, *, parent: str | None = None, **attributes: Any) -> Iterator[Any]:
    """A child span of the current one (a no-op without tracing). `parent`, the W3C traceparent stored with the
    job, is its parent instead when there is no current span (an embedded worker process) or the current one
    belongs to another trace: a Celery message is a token for the next job of its queue, fairly claimed, which
    need not be the job whose upload published it. The job's span then stays in its own job's trace, linked to
    the task span that ran it."""
    if not enabled():
        yield None
        return
    from opentelemetry import trace

    ctx, links = None, None
    current = trace.get_current_span().get_span_context()
    if parent:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        theirs = TraceContextTextMapPropagator().extract({"traceparent": parent})
        stored = trace.get_current_span(theirs).get_span_context()
        if stored.is_valid and (not current.is_valid or current.trace_id != stored.trace_id):
            ctx = theirs
            links = [trace.Link(current)] if current.is_valid else None
    tracer = trace.get_tracer("mstar")
    with tracer.start_as_current_span(name, context=ctx, links=links, attributes=attributes) as s:
        yield s


class StageSpans:
    """One span per pipeline stage, made current while the stage runs (so model calls nest inside it); `switch`
    is called from the job's progress callback on each stage change, `close` once at the end."""

    def __init__(self) -> None:
        self._span: Any = None
        self._token: Any = None

    def switch(self, stage: str) -> None:
        if not enabled():
            return
        from opentelemetry import context, trace

        self.close()
        self._span = trace.get_tracer("mstar").start_span(f"stage {stage}", attributes={"mstar.stage": stage})
        self._token = context.attach(trace.set_span_in_context(self._span))

    def close(self) -> None:
        if self._span is None:
            return
        from opentelemetry import context

        context.detach(self._token)
        self._span.end()
        self._span = self._token = None
