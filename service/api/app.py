"""`create_app(settings)`: the FastAPI gateway with its store, blob store, runner and metrics.

Start-up creates missing tables, installs bootstrap API keys, removes half-written blobs from a crash,
validates the model bundle and starts the job runner (which re-queues jobs a previous run left behind).
"""

from __future__ import annotations

import hashlib
import logging
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from service import __version__
from service.api.errors import install_handlers
from service.api.metrics import Metrics, MetricsMiddleware
from service.api.responses import ERRORS
from service.api.schemas import ModelInfo, ModelsOut
from service.config import Settings
from service.errors import BundleError, InvalidParameterError, MstarError
from service.runner import JobQueue, make_queue
from service.store import repo
from service.store.blobs import BlobStoreError, make_blob_store
from service.store.db import init_db, make_engine, ping, session_factory, transaction

log = logging.getLogger("mstar.api")
MAX_JSON_BODY = 1 << 20


class ServiceContext:
    """Everything a request handler needs, built once per app."""

    def __init__(self, settings: Settings, *, queue: JobQueue | None = None, pipeline: Any = None) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.engine = make_engine(settings.db_url)
        init_db(self.engine)
        self.sessions = session_factory(self.engine)
        self.blobs = make_blob_store(settings)
        self.metrics = Metrics(self._job_counts)
        self.queue: JobQueue = queue or make_queue(settings, pipeline=pipeline, on_outcome=self.metrics.observe_outcome)
        self.bundle: Any = None
        self.bundle_version: str | None = None
        self.bundle_error: str | None = None
        self._backend_checked = (0.0, {"ok": False})

    def _job_counts(self) -> dict[str, int]:
        with self.sessions() as s:
            return repo.count_by_state(s)

    # lifecycle
    def start(self) -> None:
        swept = self.blobs.sweep_partials()
        if swept:
            log.info("removed %d partial blob(s) left by a previous run", swept)
        try:  # a missing bucket or rejected credentials: say so now; /readyz keeps saying it until fixed
            self.blobs.check()
            log.info("blob store: %s", self.blobs.describe())
        except BlobStoreError as err:
            log.error("blob store unusable: %s", err)
        with transaction(self.sessions) as s:
            for key in self.settings.api_keys:
                repo.install_api_key(s, key.tenant, key.key.get_secret_value(), admin=key.admin)
        self.load_bundle()
        self.queue.start()

    def stop(self) -> None:
        self.queue.stop()
        self.engine.dispose()

    # models
    def load_bundle(self) -> None:
        """Validate the configured bundle (checksums included); on failure keep serving and say so."""
        self.bundle, self.bundle_version, self.bundle_error = None, None, None
        if self.settings.bundle_dir is None:
            return
        try:
            from service.inference.bundle import MANIFEST_NAME, load_bundle

            self.bundle = load_bundle(self.settings.bundle_dir, verify_checksums=True)
            raw = (self.bundle.root / MANIFEST_NAME).read_bytes()
            self.bundle_version = hashlib.sha256(raw).hexdigest()[:12]
        except (MstarError, ImportError, OSError) as err:
            self.bundle_error = str(err)
            log.error("model bundle refused: %s", err)

    def models_out(self) -> ModelsOut:
        if self.bundle is None:
            detail = self.bundle_error or "no model bundle configured (set MSTAR_BUNDLE_DIR)"
            return ModelsOut(bundle=None, detail=detail)
        m = self.bundle.manifest
        return ModelsOut(
            bundle=m.name,
            version=self.bundle_version,
            demo=m.demo,
            embed_dim=m.embed_dim,
            preprocessing=m.preprocessing.model_dump(mode="json"),
            provenance=m.provenance.model_dump(mode="json", exclude={"checkpoint"}),
            models=[
                ModelInfo(name=x.name, role=x.role, version=x.version, labels=x.labels, bin_edges=x.bin_edges)
                for x in m.models
            ],
        )

    def check_bundle_version(self, wanted: str | None) -> None:
        if wanted is None or self.bundle is None:
            return
        m = self.bundle.manifest
        accepted = {m.name, self.bundle_version, m.provenance.config_hash}
        if wanted not in accepted:
            raise InvalidParameterError(
                f"bundle version {wanted!r} is not served (this service runs {m.name} {self.bundle_version})"
            )

    def job_terminal(self, job_id: str) -> None:
        hook = getattr(self.queue, "job_terminal", None)
        if hook is not None:
            hook(job_id)

    # readiness
    def readiness(self) -> dict[str, dict]:
        checks: dict[str, dict] = {}
        try:
            ping(self.engine)
            self.blobs.check()
            checks["store"] = {"ok": True}
        except BlobStoreError as err:  # says what is wrong (bucket, credentials, endpoint), never a secret
            checks["store"] = {"ok": False, "detail": str(err)}
        except Exception as err:
            checks["store"] = {"ok": False, "detail": type(err).__name__}
        try:
            checks["runner"] = self.queue.health()
        except Exception as err:
            checks["runner"] = {"ok": False, "detail": type(err).__name__}
        checks["backend"] = self._backend_health()
        return checks

    def _backend_health(self) -> dict:
        """The bundle's manifest and model files, re-checked at most every 30 s (cheap: no checksums)."""
        t, cached = self._backend_checked
        if time.monotonic() - t < 30:
            return cached
        start = time.perf_counter()
        if self.settings.bundle_dir is None:
            out = {"ok": True, "detail": "no bundle configured; jobs use the pipeline's default"}
        elif self.bundle is None:
            out = {"ok": False, "detail": self.bundle_error or "bundle not loaded"}
        else:
            try:
                from service.inference.bundle import load_bundle

                load_bundle(self.settings.bundle_dir, verify_checksums=False)
                out = {"ok": True, "bundle": self.bundle.manifest.name, "version": self.bundle_version}
            except (BundleError, OSError) as err:
                out = {"ok": False, "detail": str(err)}
        self.metrics.backend_seconds.observe(time.perf_counter() - start)
        self._backend_checked = (time.monotonic(), out)
        return out


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
            ctx.stop()

    docs = settings.docs_enabled
    app = FastAPI(
        responses=ERRORS(400, 413),
        max_body_size=MAX_JSON_BODY,  # JSON bodies are small; the upload route streams under its own cap
        title="mSTAR inference service",
        version=__version__,
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
        description="Upload whole-slide images, run mSTAR analyses as durable jobs, fetch results.",
    )
    app.state.ctx = ctx
    install_handlers(app)
    app.add_middleware(MetricsMiddleware, metrics=ctx.metrics)

    from service.api.routers import health, jobs, models, slides

    for r in (slides.router, jobs.router, models.router, health.router):
        app.include_router(r)
    try:  # the pacs extra (highdicom, dicomweb-client) is optional
        from service.api.routers import pacs
    except ImportError as err:
        log.info("PACS routes off (%s)", err)
    else:
        app.include_router(pacs.router)
    return app
