"""Service settings: one class, read from `MSTAR_*` environment variables and an optional `.env` file.

Everything the gateway, the embedded runner and (later) Celery workers need to agree on lives here, so a
deployment is configured in one place. `docs/service.md` documents every variable.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class BootstrapKey(BaseModel):
    """An API key to install at start-up (e.g. from a secret manager), so a fresh deployment is usable."""

    tenant: str = Field(min_length=1, max_length=64)
    key: SecretStr
    admin: bool = False


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MSTAR_", env_file=".env", env_file_encoding="utf-8", extra="ignore")

    # storage
    data_dir: Path = Field(Path("mstar-data"), description="slides, results and the default SQLite database")
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL; default sqlite under data_dir. Production: postgresql+psycopg://user:pass@host/db",
    )
    blob_url: str | None = Field(
        None,
        description="object store for slides and results, s3://bucket[/prefix] (the `s3` extra); "
        "unset = files under data_dir/blobs (a shared mount for several machines)",
    )
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, Ceph RGW, ...); unset = AWS")
    s3_region: str | None = Field(None, description="S3 region; unset = the AWS configuration chain")
    s3_addressing_style: Literal["auto", "path", "virtual"] = Field(
        "auto", description="bucket in the path or in the host name (path for most MinIO/Ceph set-ups)"
    )
    s3_part_size_mb: int = Field(64, ge=5, le=5120, description="multipart upload/download part size and threshold")
    s3_max_concurrency: int = Field(8, ge=1, le=64, description="parallel parts per upload or download")
    s3_cache_dir: Path | None = Field(
        None, description="local cache of slides fetched from S3 on this machine; default data_dir/s3-cache"
    )
    s3_cache_max_gb: float = Field(
        50.0, gt=0, description="cache bound: least recently used copies not in use are removed above it"
    )
    s3_source_buckets: list[str] = Field(
        default_factory=list,
        description="buckets that POST /slides `source=s3://...` may read with the gateway's credentials; empty = "
        "none (a client could otherwise have the gateway copy any object it can read); the store's own bucket "
        "prefix is always refused",
    )
    upload_max_bytes: int = Field(8 * 1024**3, gt=0, description="larger uploads are refused with 413")
    upload_drain_bytes: int = Field(
        64 * 1024**2,
        ge=0,
        description="after the cap trips, read at most this much more so the "
        "client sees the 413 instead of a reset connection",
    )
    upload_idle_timeout_s: float = Field(
        30.0, gt=0, description="an upload body that sends nothing for this long is dropped (408-like 400)"
    )
    http_parser: Literal["h11", "httptools"] = Field(
        "h11",
        description="uvicorn's HTTP/1.1 parser for `mstar serve`: h11 bounds a request's head by "
        "max_header_bytes (httptools bounds nothing: four connections sending 64 MiB headers grew the gateway by "
        "250 MB, unauthenticated); httptools uploads 10-30 % faster, for a gateway behind a proxy that limits "
        "headers itself",
    )
    max_header_bytes: int = Field(
        64 * 1024, ge=4096, description="largest request line + headers h11 accepts; larger: 400, connection closed"
    )
    tenant_max_uploads: int = Field(4, ge=1, description="concurrent uploads per tenant; more answer 429")
    max_uploads: int = Field(32, ge=1, description="concurrent uploads in one gateway process; more answer 503")
    validate_timeout_s: float = Field(60.0, gt=0, description="limit for the upload check subprocess")
    validate_memory_mb: int = Field(2048, ge=0, description="address-space cap of the check process; 0 = none")

    # models and runner
    bundle_dir: Path | None = Field(None, description="model bundle (manifest + Triton repository)")
    backend: Literal["onnxruntime", "triton"] = Field(
        "onnxruntime", description="where models run: in-process onnxruntime, or a Triton server"
    )
    ort_device: Literal["auto", "cpu", "cuda", "tensorrt"] = Field("auto", description="onnxruntime providers")
    tile_decoder: Literal["cpu", "nvimgcodec", "nvimgcodec-cpu"] = Field(
        "cpu",
        description="the patch reader's tile decoder: libjpeg-turbo/OpenJPEG per tile, or batches through "
        "nvImageCodec on a GPU (nvJPEG, nvJPEG2000; extra gpu-decode); nvimgcodec-cpu = its CPU backends",
    )
    triton_url: str = Field("127.0.0.1:8001", description="Triton address (gRPC port, or HTTP with triton_protocol)")
    triton_protocol: Literal["grpc", "http"] = Field("grpc", description="Triton client protocol")
    runner_workers: int = Field(1, ge=1, le=64, description="embedded runner: worker processes")
    runner_poll_s: float = Field(0.5, gt=0, description="how often the dispatcher looks for queued jobs")
    job_max_attempts: int = Field(2, ge=1, description="a job whose worker died is retried this many times")
    tenant_max_queued: int = Field(
        1000, ge=1, description="queued jobs one tenant may have; a submit past it answers 429 quota_exceeded"
    )
    tenant_max_running: int = Field(
        0, ge=0, description="jobs of one tenant running at once; 0 = no cap (dispatch is fair across tenants anyway)"
    )
    broker_url: str | None = Field(None, description="Celery broker; None = the embedded runner")
    # distributed workers (service/worker; docs/workers.md)
    task_time_limit_s: float = Field(3600.0, gt=0, description="hard limit per job: the worker child is killed")
    task_soft_time_limit_s: float | None = Field(
        None, gt=0, description="soft limit (job fails with time_limit); default 90% of the hard limit"
    )
    broker_visibility_timeout_s: float | None = Field(
        None, gt=0, description="unacked message redelivery; must exceed the hard limit (default hard + 10% + 60 s)"
    )
    broker_restore_interval_s: float = Field(
        5.0, gt=0, description="how often a worker sweeps the broker for lost (unacked, timed-out) jobs"
    )
    worker_max_memory_mb: int = Field(0, ge=0, description="replace a worker child above this RSS; 0 = no cap")
    worker_lease_s: float = Field(
        30.0, gt=0, description="a running job whose heartbeat is older than this may be taken over"
    )
    rna_ttl_s: float = Field(
        86400.0,
        gt=0,
        description="longest a request's RNA profile is held for its job (deleted at once when the job ends); "
        "a job still queued after this fails with rna_expired",
    )
    pipeline: str = Field(
        "service.pipeline:run_analysis",
        description="`module:function` with run_analysis's signature (tests swap it)",
    )

    # auth
    api_keys: list[BootstrapKey] = Field(
        default_factory=list, description='JSON list: [{"tenant": "lab", "key": "...", "admin": false}]'
    )

    auth_cache_s: float = Field(
        5.0,
        ge=0,
        description="a checked API key is trusted from memory this long (a revoked key stops within it); 0 = off",
    )

    # webhooks
    webhook_secret: SecretStr | None = Field(None, description="HMAC-SHA256 key for webhook signatures")
    webhook_timeout_s: float = Field(10.0, gt=0, description="per delivery attempt")
    webhook_max_attempts: int = Field(5, ge=1, description="attempts before a webhook is given up")
    webhook_backoff_s: float = Field(1.0, ge=0, description="first retry delay; doubles per attempt")
    webhook_allow_private: bool = Field(False, description="allow webhook hosts on loopback/private networks")

    # http
    docs_enabled: bool = Field(True, description="serve /docs and /openapi.json")
    metrics_public: bool | None = Field(
        None,
        description="serve /metrics without a key; unset = only when `mstar serve` binds a loopback address "
        "(elsewhere /metrics needs an admin key, as Prometheus' bearer-token scrape config sends)",
    )
    log_level: str = Field("info", description="debug, info, warning, error")
    log_format: Literal["plain", "json"] = Field(
        "plain", description="plain text, or one JSON object per line (request id, job id, tenant, trace id)"
    )
    audit_enabled: bool = Field(True, description="record who created, read, downloaded, cancelled or deleted what")
    worker_metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="`mstar worker`: serve Prometheus metrics of all its pool processes on this port (unset = off)",
    )

    @field_validator("blob_url")
    @classmethod
    def _check_blob_url(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        v = v.strip()
        if not re.fullmatch(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[A-Za-z0-9._/-]*)?", v):
            raise ValueError(f"MSTAR_BLOB_URL must look like s3://bucket or s3://bucket/prefix, got {v!r}")
        return v

    @field_validator("s3_endpoint_url")
    @classmethod
    def _check_endpoint(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", v.strip()):
            raise ValueError(f"MSTAR_S3_ENDPOINT_URL must be an http(s):// URL, got {v!r}")
        return v.strip() if v else None

    @property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'mstar.db').resolve()}"

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def work_dir(self) -> Path:
        """Scratch space for jobs in progress; on the same filesystem as the blobs so moves are renames."""
        return self.data_dir / "work"


def time_limits(settings: Settings) -> tuple[float, float]:
    """(soft, hard) seconds per job, checked: the same for Celery workers and the embedded runner."""
    from service.errors import InvalidParameterError

    hard = float(settings.task_time_limit_s)
    soft = float(settings.task_soft_time_limit_s or hard * 0.9)
    if not soft < hard:
        raise InvalidParameterError(f"task_soft_time_limit_s ({soft:g}) must be below task_time_limit_s ({hard:g})")
    return soft, hard
