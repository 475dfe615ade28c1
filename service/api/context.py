"""`ServiceContext`: everything a request handler needs (settings, store, queue, bundle, metrics), built once per
app, so routes receive one typed object instead of reaching into `app.state`."""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from service.api.metrics import Metrics
from service.api.schemas import AnalysisRequest, ModelInfo, ModelsOut
from service.config import Settings
from service.errors import BundleError, BundleUnavailableError, InvalidParameterError, MstarError
from service.jobs import lifecycle
from service.jobs.factory import make_queue
from service.jobs.protocol import JobQueue
from service.jobs.resources import open_store
from service.jobs.submit import Submitted, submit_analysis
from service.store import repo
from service.store.blobs import BlobStore, BlobStoreError
from service.store.db import ping, transaction
from service.store.models import Slide

log = logging.getLogger("mstar.api")


class AuthCache:
    """Recently checked API keys -> their principal, for `ttl_s` seconds (0 = off): a revoked key stops working
    within that time. Keys are held as SHA-256 digests, never in clear."""

    def __init__(self, ttl_s: float, max_entries: int = 10_000) -> None:
        self.ttl_s, self.max_entries = ttl_s, max_entries
        self._entries: dict[str, tuple[float, Any]] = {}

    @staticmethod
    def _key(tokens: list[str]) -> str:
        return hashlib.sha256("\0".join(tokens).encode()).hexdigest()

    def get(self, tokens: list[str]) -> Any | None:
        if self.ttl_s <= 0:
            return None
        hit = self._entries.get(self._key(tokens))
        if hit is None or hit[0] < time.monotonic():
            return None
        return hit[1]

    def put(self, tokens: list[str], principal: Any) -> None:
        if self.ttl_s <= 0:
            return
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[self._key(tokens)] = (time.monotonic() + self.ttl_s, principal)


class ServiceContext:
    """Everything a request handler needs, built once per app."""

    def __init__(self, settings: Settings, *, queue: JobQueue | None = None, pipeline: Any = None) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        store = open_store(settings)
        self.engine: Engine = store.engine
        self.sessions: sessionmaker[Session] = store.sessions
        self.blobs: BlobStore = store.blobs
        self.metrics = Metrics(self._job_counts)
        self.auth_cache = AuthCache(settings.auth_cache_s)
        self._audit_writer: Any = None
        self.queue: JobQueue = queue or make_queue(settings, pipeline=pipeline, on_outcome=self._outcome)
        self.bundle: Any = None
        self.bundle_version: str | None = None
        self.bundle_error: str | None = None
        self._backend_checked = (0.0, {"ok": False})

    def _outcome(self, outcome: Any) -> None:
        """A job the embedded runner finished: count it, and let its pollers see the new state at once."""
        from service.api.lookups import POLLS

        POLLS.forget_jobs([outcome.job_id, *getattr(outcome, "followers_done", [])])
        self.metrics.observe_outcome(outcome)

    def _job_counts(self) -> tuple[dict[str, int], dict[str, dict[str, float]]]:
        with self.sessions() as s:
            return lifecycle.count_by_state(s), lifecycle.queue_stats(s)

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

    @property
    def audit_writer(self) -> Any:
        """The batched audit writer (`service.api.observe.AuditWriter`), started on first use."""
        if self._audit_writer is None:
            from service.api.observe import AuditWriter

            self._audit_writer = AuditWriter(self.sessions)
        return self._audit_writer

    def stop(self) -> None:
        self.queue.stop()
        if self._audit_writer is not None:
            self._audit_writer.close()

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

    def require_bundle(self) -> None:
        """Refuse (503) while the configured bundle is refused: each analysis was accepted and then failed."""
        if self.settings.bundle_dir is not None and self.bundle is None:
            raise BundleUnavailableError(
                f"the model bundle was refused ({self.bundle_error}); no analysis can run until it is fixed and "
                "reloaded (POST /models/reload)"
            )

    def submit(self, tenant_id: str, slide: Slide, req: AnalysisRequest, **kwargs: Any) -> Submitted:
        """Queue an analysis of `slide` as `req` asks (see `service.jobs.submit`)."""
        self.require_bundle()
        self.check_bundle_version(req.bundle_version)
        return submit_analysis(
            self.sessions,
            self.queue,
            self.settings,
            tenant_id=tenant_id,
            slide_id=slide.id,
            slide_sha256=slide.sha256,
            options=req.to_options(),
            bundle_version=self.bundle_version,
            webhook_url=req.webhook_url,
            fresh=req.fresh,
            **kwargs,
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
