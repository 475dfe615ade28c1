"""Request and response models (pydantic v2). Responses are allow-lists: internal paths, blob keys, hashes of
keys and tenant ids never leave the service."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_serializer, model_validator

from service.slides.base import MPP_MAX, MPP_MIN

Task = Literal["embedding", "classification", "survival", "report", "zeroshot"]
JobState = Literal["queued", "running", "succeeded", "failed", "canceled"]
DEFAULT_TASKS: list[Task] = ["embedding", "classification", "survival", "report"]


def _utc(dt: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; they were written in UTC."""
    if dt is None:
        return None
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class SlideOut(BaseModel):
    id: str
    sha256: str
    format: str
    size_bytes: int
    mpp_override: float | None = None
    info: dict = Field(description="levels, µm/px and its source, vendor; never label or macro images")
    created_at: datetime

    @field_serializer("created_at")
    def _ts(self, v: datetime) -> datetime | None:
        return _utc(v)


class Page(BaseModel):
    total: int
    limit: int
    offset: int
    next_offset: int | None

    @classmethod
    def of(cls, items: list, *, total: int, limit: int, offset: int) -> Self:
        """This page of `items`, with `next_offset` set while rows remain after it."""
        end = offset + len(items)
        return cls(items=items, total=total, limit=limit, offset=offset, next_offset=end if end < total else None)


class SlidePage(Page):
    items: list[SlideOut]


Prompt = Annotated[str, Field(min_length=1, max_length=500, pattern=r"\S")]  # not blank: refused at submit
GeneId = Annotated[str, Field(min_length=1, max_length=64)]
RnaValue = Annotated[float, Field(allow_inf_nan=False, strict=True)]
MAX_RNA_GENES = 100_000


class RnaProfileIn(BaseModel):
    """One case's RNA-Seq profile as two parallel lists, on the scale the bundle's RNA head was trained on
    (log1p TPM for the house heads). Patient data: never logged, never stored beyond the job that uses it."""

    model_config = ConfigDict(extra="forbid")

    genes: list[GeneId] = Field(
        min_length=1, max_length=MAX_RNA_GENES, repr=False, description="gene symbols or Ensembl ids"
    )
    values: list[RnaValue] = Field(
        min_length=1, max_length=MAX_RNA_GENES, repr=False, description="one finite number per gene"
    )

    @model_validator(mode="after")
    def _same_length(self) -> RnaProfileIn:
        if len(self.genes) != len(self.values):
            raise ValueError(f"{len(self.genes)} genes but {len(self.values)} values")
        return self


class AnalysisRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tasks: list[Task] = Field(default_factory=lambda: list(DEFAULT_TASKS), min_length=1, max_length=5)
    prompts: list[Prompt] = Field(
        default_factory=list, max_length=64, description="class descriptions for zero-shot scoring"
    )
    mpp_override: float | None = Field(
        None, ge=MPP_MIN, le=MPP_MAX, description="µm/px to use instead of the slide's metadata"
    )
    bundle_version: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="refuse to run unless the served bundle has this version",
    )
    webhook_url: str | None = Field(
        None,
        max_length=2048,
        pattern=r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[!-~]*)?$",
        description="POSTed a signed JSON event when the job finishes (a public http(s) address)",
    )
    fresh: bool = Field(
        False,
        description="run the analysis again even when an identical one (same slide, bundle and options) "
        "succeeded or is under way; by default its result is reused",
    )

    region: dict | list | None = Field(
        None,
        description=(
            "GeoJSON Polygon/MultiPolygon, Feature or FeatureCollection (a QuPath export as is) in level-0 pixels: "
            "only patches whose centre lies inside are read and analysed"
        ),
    )

    rna: RnaProfileIn | None = Field(
        None,
        repr=False,
        description=(
            "an RNA-Seq profile for the bundle's slide + RNA head (`rna_fusion`): the result gains `multimodal` "
            "(fused risk next to the slide-only risk, per-modality contributions). Or send it as the multipart "
            "part `rna` (a file). Held only until the job ends; a bundle without the head refuses it (422)"
        ),
    )

    @model_validator(mode="after")
    def _region_is_a_polygon(self) -> AnalysisRequest:
        if self.region is not None:
            from service.errors import InvalidParameterError
            from service.results.roi import parse_region

            try:
                parse_region(self.region)
            except InvalidParameterError as err:
                raise ValueError(str(err)) from None
        return self

    @model_validator(mode="after")
    def _zeroshot_needs_prompts(self) -> AnalysisRequest:
        if self.prompts and "zeroshot" not in self.tasks:
            if "tasks" in self.model_fields_set:  # prompts were silently ignored: the job succeeded without them
                raise ValueError("prompts are scored by the zeroshot task: add 'zeroshot' to tasks")
            self.tasks = [*self.tasks, "zeroshot"]  # as `mstar analyze --prompt` does
        if "zeroshot" in self.tasks and len(self.prompts) < 2:
            raise ValueError("zero-shot scoring needs at least two prompts")
        self.tasks = list(dict.fromkeys(self.tasks))
        return self

    def to_options(self) -> dict:
        return {
            "tasks": list(self.tasks),
            "prompts": list(self.prompts),
            "mpp_override": self.mpp_override,
            "bundle_version": self.bundle_version,
            **({"region": self.region} if self.region is not None else {}),
        }


class JobLinks(BaseModel):
    self: str
    slide: str
    result: str | None = None
    features: str | None = None
    heatmap: str | None = None
    annotations: str | None = Field(None, description="QuPath GeoJSON of the result")
    dicom: str | None = Field(None, description="the DICOM result objects as a ZIP (PACS analyses)")


class WebhookStatus(BaseModel):
    """Where the job's terminal webhook stands. The URL is not echoed back: it may carry a token."""

    state: Literal["waiting", "sending", "done"] = Field(
        description="waiting: the job is not over or no sender has picked it up; sending: retries under way"
    )
    delivered: bool | None = Field(None, description="done: a 2xx came back (false: every attempt failed)")
    sent_at: datetime | None = None

    @field_serializer("sent_at")
    def _ts(self, v: datetime | None) -> datetime | None:
        return _utc(v)


class JobOut(BaseModel):
    id: str
    slide_id: str
    state: JobState
    stage: str | None
    progress: float = Field(ge=0, le=1)
    error: ErrorDetail | None = None
    attempts: int
    options: dict
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    stage_seconds: dict[str, float] = Field(default_factory=dict)
    webhook: WebhookStatus | None = Field(None, description="only for jobs submitted with a webhook_url")
    trace_id: str | None = Field(None, description="the OpenTelemetry trace the job ran under (when tracing is on)")
    links: JobLinks

    @field_serializer("created_at", "started_at", "finished_at")
    def _ts(self, v: datetime | None) -> datetime | None:
        return _utc(v)


class JobPage(Page):
    items: list[JobOut]


class AuditEventOut(BaseModel):
    id: int
    at: datetime
    tenant_id: str | None = Field(description="the caller's tenant (null: the key was refused)")
    key_prefix: str | None = Field(description="the public half of the key used")
    action: str
    resource: str
    resource_id: str | None
    method: str
    route: str = Field(description="the route template, e.g. /jobs/{job_id}/result")
    status: int
    client: str | None = Field(description="the peer address")
    request_id: str | None

    @field_serializer("at")
    def _ts(self, v: datetime) -> datetime | None:
        return _utc(v)


class AuditPage(Page):
    items: list[AuditEventOut]


class UploadAccepted(BaseModel):
    slide: SlideOut
    job: JobOut


class ModelInfo(BaseModel):
    name: str
    role: str
    version: int
    labels: list[str] | None = None
    bin_edges: list[float] | None = None


class ModelsOut(BaseModel):
    bundle: str | None = Field(description="bundle name, or null when no bundle is configured")
    version: str | None = None
    demo: bool | None = None
    embed_dim: int | None = None
    preprocessing: dict | None = None
    provenance: dict | None = None
    models: list[ModelInfo] = Field(default_factory=list)
    detail: str | None = None


class HealthOut(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, dict] = Field(default_factory=dict)
