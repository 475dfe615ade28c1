"""`create_app(settings)`: the FastAPI gateway with its store, blob store, runner and metrics.

Start-up creates missing tables, installs bootstrap API keys, removes half-written blobs from a crash,
validates the model bundle and starts the job runner (which re-queues jobs a previous run left behind).
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from service import __version__
from service.api.body_limit import GatewayApp
from service.api.context import ServiceContext
from service.api.errors import install_handlers
from service.api.head import HeadAsGet
from service.api.metrics import MetricsMiddleware
from service.api.observe import RequestContextMiddleware
from service.api.responses import ERRORS
from service.config import Settings
from service.jobs.protocol import JobQueue
from service.obs import tracing

log = logging.getLogger("mstar.api")
MAX_JSON_BODY = 1 << 20


def create_app(settings: Settings | None = None, *, queue: JobQueue | None = None, pipeline: Any = None) -> FastAPI:
    """The gateway. `queue` replaces the embedded runner (Celery); `pipeline` replaces `run_analysis`
    (tests)."""
    settings = settings or Settings()
    ctx = ServiceContext(settings, queue=queue, pipeline=pipeline)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        ctx.start()
        try:
            yield
        finally:
            app.state.tiles.close()
            ctx.stop()

    docs = settings.docs_enabled
    app = GatewayApp(
        responses=ERRORS(400, 413),
        max_body_size=MAX_JSON_BODY,  # JSON bodies are small; the upload route streams under its own cap
        title="mSTAR inference service",
        version=__version__,
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
        description="Upload whole-slide images, run mSTAR analyses as durable jobs, fetch results.",
        telemetry=tracing.fastapi_telemetry(),  # request spans once tracing.setup has run (below)
    )
    app.state.ctx = ctx
    install_handlers(app)
    app.add_middleware(HeadAsGet)  # innermost: the router sees a GET, metrics and the audit see the HEAD
    app.add_middleware(MetricsMiddleware, metrics=ctx.metrics)
    app.add_middleware(RequestContextMiddleware, ctx=ctx)  # outermost: request id on every response, audit after

    from service.api.routers import audit, health, jobs, models, results, slides, tiles, ui
    from service.api.tiles import TileCache

    app.state.tiles = TileCache(ctx.blobs)
    for r in (slides.router, jobs.router, results.router, tiles.router, models.router, health.router, ui.router):
        app.include_router(r)
    ui.mount_static(app)
    try:  # the pacs extra (highdicom, dicomweb-client) is optional
        from service.api.routers import pacs
    except ImportError as err:
        log.info("PACS routes off (%s)", err)
    else:
        app.include_router(pacs.router)
    app.include_router(audit.router)
    if tracing.setup("mstar-gateway"):  # OTEL_* configured: FastAPI's telemetry makes the request spans
        tracing.instrument_celery()  # the publish carries the trace to the worker
    return app
