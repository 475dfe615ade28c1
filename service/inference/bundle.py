"""The model bundle: the contract between `training` (which writes it) and `service` (which serves it).

A bundle is a Triton model repository (`<name>/config.pbtxt`, `<name>/<version>/model.onnx`) plus one
manifest, `bundle.json`, at its root. The manifest says everything the service needs to run the models
without torch: names, versions, tensor names/dtypes/shapes, preprocessing, class labels, survival bins,
tokenizer, checksums and provenance. `load_bundle` validates all of it at start-up, so a worker refuses a
bundle it cannot serve before it accepts a job rather than failing on the first slide.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from service.atomic import atomic_path
from service.errors import BundleError

SCHEMA_VERSION = 1
MANIFEST_NAME = "bundle.json"

Role = Literal[
    "patch_encoder", "aggregator", "classifier", "survival", "text_encoder", "report_encoder", "report_decoder", "head"
]
DType = Literal["uint8", "int8", "int32", "int64", "float16", "float32", "bool"]
HEAD_ROLES: tuple[str, ...] = ("classifier", "survival", "head")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """One input or output. `shape` is the full ONNX shape; a string is a named dynamic axis."""

    name: str = Field(min_length=1)
    dtype: DType
    shape: list[int | str]

    @field_validator("shape")
    @classmethod
    def _dims(cls, shape: list[int | str]) -> list[int | str]:
        for d in shape:
            if isinstance(d, int) and d < 1:
                raise ValueError(f"static dims must be >= 1 (use a name for a dynamic axis), got {d}")
        return shape


class ModelSpec(_Strict):
    """One servable model. `max_batch_size > 0` means axis 0 of every input and output is the batch axis
    (Triton may batch requests); 0 means the shapes are taken as they are (e.g. the aggregator's [N, D])."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    role: Role
    version: int = Field(default=1, ge=1)
    file: str  # relative to the bundle root
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    max_batch_size: int = Field(default=0, ge=0)
    consumes: Literal["pixels", "patch_features", "slide_embedding", "text", "tokens", "memory"] | None = None
    labels: list[str] | None = None
    bin_edges: list[float] | None = None
    description: str = ""

    @model_validator(mode="after")
    def _role_fields(self) -> ModelSpec:
        if self.role == "classifier" and not self.labels:
            raise ValueError(f"classifier {self.name!r} needs class labels")
        if self.role == "survival":
            if not self.bin_edges or len(self.bin_edges) < 2:
                raise ValueError(f"survival head {self.name!r} needs >= 2 bin edges")
            if any(b <= a for a, b in zip(self.bin_edges, self.bin_edges[1:], strict=False)):
                raise ValueError(f"survival head {self.name!r}: bin edges must increase")
        if Path(self.file).is_absolute() or ".." in Path(self.file).parts:
            raise ValueError(f"model file {self.file!r} must be a relative path inside the bundle")
        for group in (self.inputs, self.outputs):
            names = [t.name for t in group]
            if len(set(names)) != len(names):
                raise ValueError(f"{self.name!r}: duplicate tensor names {names}")
        return self

    def input(self, name: str | None = None) -> TensorSpec:
        return self.inputs[0] if name is None else next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)


class Preprocessing(_Strict):
    """How patches are cut and fed: the pipeline hands exactly `patch_size`² uint8 RGB patches (NHWC, the
    model's input size); when `uint8_input` the graph itself does /255 and mean/std.

    The field of view: a patch covers `field_um` µm of tissue per side, cut from the slide at `target_mpp` and
    resized to `patch_size` (official mSTAR/UNI: 256 px at 0.5 µm/px = 128 µm, resized to 224). Without
    `field_um` (older manifests) a patch is `patch_size` px at `target_mpp`, with no resize."""

    patch_size: int = Field(ge=8, le=4096)
    target_mpp: float = Field(gt=0.05, lt=20)
    field_um: float | None = Field(default=None, gt=0)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    uint8_input: bool = True
    layout: Literal["NHWC"] = "NHWC"

    @property
    def patch_um(self) -> float:
        """µm of tissue per patch side."""
        return self.field_um if self.field_um is not None else self.patch_size * self.target_mpp

    @property
    def read_px(self) -> int:
        """Pixels per patch side at `target_mpp`, before the resize to `patch_size`."""
        return round(self.patch_um / self.target_mpp)

    @property
    def grid_mpp(self) -> float:
        """µm per pixel of the `patch_size` patches the encoder sees (what the tiler is asked for)."""
        return self.patch_um / self.patch_size


class TokenizerSpec(_Strict):
    path: str  # a directory or file relative to the bundle root (HF tokenizer.json)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")  # of the file, when a file
    max_length: int = Field(default=128, ge=1)


class VocabSpec(_Strict):
    """The report decoder's word vocabulary: a JSON file `{"itos": [...], "pad", "bos", "eos", "unk"}`."""

    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    max_len: int = Field(default=100, ge=1)


class EncoderLineage(_Strict):
    """Where the patch encoder's weights come from: its config and the training stages that made it, in order
    (the demo: `stage0` distilled from a feature encoder, then `stage2` self-taught against the Stage-1 aggregator)."""

    arch: str  # patch-encoder config name (training.models.patch_encoder.PATCH_ENCODERS)
    timm_model: str | None = None  # the timm architecture it builds
    stages: list[str] = Field(default_factory=list)  # e.g. ["stage0", "stage2"]
    details: dict[str, Any] = Field(default_factory=dict)  # per-stage notes (steps, teacher, losses)


class Provenance(_Strict):
    source: str  # "mstar export", "mstar import-encoder", ...
    created: datetime
    run_id: str | None = None
    config_hash: str | None = None
    git_commit: str | None = None
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    notes: str = ""
    encoder: EncoderLineage | None = None  # absent in older manifests and imported encoders
    # `mstar export-runs`: the training outputs it was built from ({"encoder": {"file", "sha256", "arch"},
    # "stage1", "report": {"file", "sha256"}, "heads": {name: {"file", "sha256"}}})
    inputs: dict[str, Any] | None = None


class RnaFusionSpec(_Strict):
    """An optional slide + RNA head (issue 18): its ONNX graph `(features [N, D], rna [G]) -> (logits,
    wsi_contribution, rna_contribution)`, the gene list in input order and the training means imputed for missing
    genes. Not one of `models`: it runs only when a request carries an RNA profile, on the ONNX Runtime backend."""

    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    task: Literal["survival", "classification"]
    fusion: str
    modalities: list[Literal["wsi", "rna"]] = Field(min_length=1)
    genes: list[str] = Field(min_length=1)
    impute_mean: list[float] = Field(min_length=1)
    labels: list[str] | None = None
    bin_edges: list[float] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> RnaFusionSpec:
        if len(self.genes) != len(self.impute_mean):
            raise ValueError(f"rna_fusion: {len(self.genes)} genes but {len(self.impute_mean)} imputation means")
        if Path(self.file).is_absolute() or ".." in Path(self.file).parts:
            raise ValueError(f"rna_fusion file {self.file!r} must be a relative path inside the bundle")
        if self.task == "survival" and (not self.bin_edges or len(self.bin_edges) < 2):
            raise ValueError("a survival rna_fusion head needs >= 2 bin edges")
        if self.task == "classification" and not self.labels:
            raise ValueError("a classification rna_fusion head needs class labels")
        return self


OFFICIAL_ZEROSHOT_SCALE = 14.29  # exp(log(1/0.07)): the fixed CLIP scale of the official zero-shot code


class ZeroShotSpec(_Strict):
    """How prompts score a slide: one definition for evaluation (`training.downstream.zeroshot`) and serving.

    `mi_zero_topk` (the official method, mSTAR §3.4): cosine logits of every patch embedding (the aggregator's
    per-patch output tokens, in the shared text space) against each prompt embedding, mean of the `topk` highest
    per prompt. `slide_level`: cosine of the aggregator's slide embedding. Probabilities: softmax over the prompts
    of `logit_scale` × logits. A manifest without this block is served with these defaults."""

    method: Literal["mi_zero_topk", "slide_level"] = "mi_zero_topk"
    logit_scale: float = Field(default=OFFICIAL_ZEROSHOT_SCALE, gt=0, le=1000)
    topk: int = Field(default=50, ge=1)  # [ASSUME] when no validation run chose one (official grid 1,5,10,50,100)
    patch_embedding: Literal["aggregator_tokens"] = "aggregator_tokens"

    def logits(self, class_emb: np.ndarray, patch_emb: np.ndarray | None, slide_emb: np.ndarray | None) -> np.ndarray:
        """Cosine logits `[C]` of one slide for class (prompt) embeddings `[C, E]` (normalised here)."""
        if self.method == "slide_level":
            if slide_emb is None:
                raise BundleError("slide-level zero-shot needs a slide embedding")
            return slide_logits(slide_emb, class_emb)
        if patch_emb is None:
            raise BundleError("MI-Zero zero-shot needs per-patch embeddings (the aggregator's tokens)")
        return mi_zero_logits(patch_emb, class_emb, self.topk)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Softmax over the last axis of `logit_scale` × logits."""
        z = self.logit_scale * np.asarray(logits, np.float64)
        z = np.exp(z - z.max(axis=-1, keepdims=True))
        return z / z.sum(axis=-1, keepdims=True)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def mi_zero_logits(patch_emb: np.ndarray, class_emb: np.ndarray, topk: int) -> np.ndarray:
    """MI-Zero top-k pooling: per class, the mean of the `topk` highest patch cosine logits (`[N, E]`, `[C, E]`)."""
    logits = _unit(patch_emb) @ _unit(class_emb).T  # [N, C]
    k = min(int(topk), logits.shape[0])
    return -np.sort(-logits, axis=0)[:k].mean(0)


def slide_logits(slide_emb: np.ndarray, class_emb: np.ndarray) -> np.ndarray:
    """Cosine logits `[C]` of one slide embedding `[E]`."""
    return _unit(class_emb) @ _unit(np.reshape(slide_emb, -1))


class BundleManifest(_Strict):
    schema_version: int
    name: str
    demo: bool
    embed_dim: int = Field(ge=1)  # patch feature dimension D
    slide_dim: int | None = Field(default=None, ge=1)
    preprocessing: Preprocessing
    models: list[ModelSpec] = Field(min_length=1)
    tokenizer: TokenizerSpec | None = None
    report_vocab: VocabSpec | None = None
    zeroshot: ZeroShotSpec | None = None  # None: served with the ZeroShotSpec defaults (the official method)
    provenance: Provenance
    rna_fusion: RnaFusionSpec | None = None  # optional; manifests without it load as before

    @model_validator(mode="after")
    def _consistent(self) -> BundleManifest:
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(
                f"schema_version {self.schema_version} is not supported (this service reads {SCHEMA_VERSION})"
            )
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate model names {names}")
        roles = [m.role for m in self.models]
        if roles.count("patch_encoder") != 1:
            raise ValueError("a bundle needs exactly one patch_encoder")
        if roles.count("aggregator") > 1:
            raise ValueError("a bundle has at most one aggregator")
        enc = next(m for m in self.models if m.role == "patch_encoder")
        s = self.preprocessing.patch_size
        want_in = ["uint8", [s, s, 3]] if self.preprocessing.uint8_input else ["float32", [3, s, s]]
        x = enc.inputs[0]
        if [x.dtype, x.shape[1:]] != want_in:
            raise ValueError(f"patch encoder input {x.dtype} {x.shape} does not match preprocessing {want_in}")
        if enc.outputs[0].shape[1:] != [self.embed_dim]:
            raise ValueError(f"patch encoder output {enc.outputs[0].shape} is not [batch, {self.embed_dim}]")
        agg = next((m for m in self.models if m.role == "aggregator"), None)
        if agg is not None and agg.inputs[0].shape[-1] != self.embed_dim:
            raise ValueError(f"aggregator input {agg.inputs[0].shape} does not take {self.embed_dim}-d features")
        for m in self.models:
            width = m.outputs[0].shape[-1] if m.outputs[0].shape else None
            if not isinstance(width, int):
                continue
            if m.role == "classifier" and m.labels and len(m.labels) != width:
                raise ValueError(f"classifier {m.name!r} has {len(m.labels)} labels for {width} logits")
            if m.role == "survival" and m.bin_edges and len(m.bin_edges) != width + 1:
                raise ValueError(f"survival head {m.name!r} has {len(m.bin_edges)} bin edges for {width} intervals")
        if "text_encoder" in roles and self.tokenizer is None:
            raise ValueError("a text_encoder needs a tokenizer")
        if "report_decoder" in roles and ("report_encoder" not in roles or self.report_vocab is None):
            raise ValueError("a report_decoder needs a report_encoder and a report_vocab")
        return self


@dataclass(frozen=True)
class Bundle:
    """A validated bundle on disk. `verified`: each file whose checksum `load_bundle` checked, with its
    (inode, size, mtime) then, so `check_unchanged` re-hashes only a file that changed since."""

    root: Path
    manifest: BundleManifest
    verified: dict[str, tuple[int, int, int]] = field(default_factory=dict, compare=False)

    def check_unchanged(self, rel: str, sha: str, what: str) -> Path:
        """The path of `rel`, refused when it no longer matches the manifest's `sha`: a file replaced under a
        running worker was used unverified while results named the manifest's checksum. A file whose (inode, size,
        mtime) are those it was verified with is not hashed again (a ViT-L graph is 1.2 GB)."""
        path = self.root / rel
        try:
            if self.verified.get(rel) == _signature(path):
                return path
            got = sha256_file(path)
        except OSError as err:
            raise BundleError(f"{what}: cannot read {rel}: {err}") from None
        if got != sha:
            raise BundleError(
                f"{what}: {rel} changed since the bundle was loaded (manifest {sha[:12]}…, file {got[:12]}…); "
                "reload the bundle"
            )
        return path

    def model(self, name: str) -> ModelSpec:
        for m in self.manifest.models:
            if m.name == name:
                return m
        raise BundleError(f"bundle {self.root} has no model {name!r} (has {[m.name for m in self.manifest.models]})")

    def path(self, name: str) -> Path:
        return self.root / self.model(name).file

    def by_role(self, *roles: str) -> list[ModelSpec]:
        return [m for m in self.manifest.models if m.role in roles]

    @property
    def patch_encoder(self) -> ModelSpec:
        return self.by_role("patch_encoder")[0]

    @property
    def aggregator(self) -> ModelSpec | None:
        found = self.by_role("aggregator")
        return found[0] if found else None

    @property
    def heads(self) -> list[ModelSpec]:
        return self.by_role(*HEAD_ROLES)

    @property
    def text_encoder(self) -> ModelSpec | None:
        found = self.by_role("text_encoder")
        return found[0] if found else None

    @property
    def report_models(self) -> tuple[ModelSpec, ModelSpec] | None:
        """(report_encoder, report_decoder) when the bundle can write reports."""
        enc, dec = self.by_role("report_encoder"), self.by_role("report_decoder")
        return (enc[0], dec[0]) if enc and dec else None

    @property
    def zeroshot(self) -> ZeroShotSpec:
        """The zero-shot method recorded at export (older manifests: the official defaults)."""
        return self.manifest.zeroshot or ZeroShotSpec()

    @property
    def tokenizer_path(self) -> Path | None:
        tok = self.manifest.tokenizer
        return None if tok is None else self.root / tok.path


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _signature(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def _check_file(root: Path, rel: str, sha: str | None, what: str, verify: bool) -> tuple[int, int, int] | None:
    """Refuse what `rel` cannot be; with `verify`, check its checksum and return the file's signature then."""
    try:
        p = (root / rel).resolve()
        inside = p.is_relative_to(root.resolve())
    except (OSError, RuntimeError) as err:  # a symlink loop: RuntimeError from resolve()
        raise BundleError(f"{what} file {rel!r} cannot be resolved: {err}") from None
    if not inside:
        raise BundleError(f"{what} {rel!r} points outside the bundle {root}")
    if not p.exists():
        raise BundleError(f"{what} file {rel!r} is missing from bundle {root} (weights are written by `mstar export`)")
    if not p.is_file():
        raise BundleError(f"{what} {rel!r} is not a file")
    if not verify or sha is None:
        return None
    before = _signature(p)
    got = sha256_file(p)
    if got != sha:
        raise BundleError(f"{what} file {rel!r} fails its checksum (manifest {sha[:12]}…, file {got[:12]}…)")
    return before if _signature(p) == before else None  # changed while hashed: checked again on use


def _check_vocab(path: Path, manifest: BundleManifest) -> None:
    """The report vocabulary must have one word per decoder logit (a shorter one failed every report with an
    IndexError), and its special tokens must be words of it."""
    try:
        doc = json.loads(path.read_text())
        itos = doc["itos"]
        specials = [int(doc[k]) for k in ("pad", "bos", "eos", "unk")]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        why = "not UTF-8 JSON" if isinstance(err, UnicodeDecodeError) else f"{type(err).__name__}: {str(err)[:120]}"
        raise BundleError(f"report vocabulary {path.name} is not a vocabulary ({why})") from None
    if not isinstance(itos, list) or any(not 0 <= i < len(itos) for i in specials):
        raise BundleError(f"report vocabulary {path.name}: 'itos' must list every word, special tokens included")
    dec = next((m for m in manifest.models if m.role == "report_decoder"), None)
    width = dec.outputs[0].shape[-1] if dec is not None and dec.outputs[0].shape else None
    if isinstance(width, int) and width != len(itos):
        raise BundleError(f"report vocabulary {path.name} has {len(itos)} words for {width} decoder logits")


def parse_manifest(data: dict | str | bytes) -> BundleManifest:
    """Validate a manifest document; any schema problem becomes a `BundleError` naming the field."""
    try:
        if isinstance(data, str | bytes):
            return BundleManifest.model_validate_json(data)
        return BundleManifest.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(root)"
        raise BundleError(f"invalid bundle manifest at {loc}: {first['msg']} ({err.error_count()} error(s))") from err


def load_bundle(root: str | Path, *, verify_checksums: bool = True) -> Bundle:
    """Read and validate `root/bundle.json` (or a manifest path) and every file it names.

    Refuses with `BundleError`: no manifest, bad JSON, schema violations, missing files, checksum mismatch.
    """
    root = Path(root)
    manifest_path = root if root.is_file() else root / MANIFEST_NAME
    root = manifest_path.parent
    if not manifest_path.is_file():
        raise BundleError(f"no bundle manifest at {manifest_path}")
    try:
        raw = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"bundle manifest {manifest_path} is not readable JSON: {err}") from err
    if not isinstance(raw, dict):
        raise BundleError(f"bundle manifest {manifest_path} must be a JSON object")
    manifest = parse_manifest(raw)
    verified: dict[str, tuple[int, int, int]] = {}
    for m in manifest.models:
        if sig := _check_file(root, m.file, m.sha256, f"model {m.name!r}", verify_checksums):
            verified[m.file] = sig
    if manifest.tokenizer is not None:
        _check_file(root, manifest.tokenizer.path, manifest.tokenizer.sha256, "tokenizer", verify_checksums)
    if manifest.report_vocab is not None:
        v = manifest.report_vocab
        _check_file(root, v.path, v.sha256, "report vocabulary", verify_checksums)
        _check_vocab(root / v.path, manifest)
    if manifest.rna_fusion is not None:
        fusion = manifest.rna_fusion
        if sig := _check_file(root, fusion.file, fusion.sha256, "rna_fusion head", verify_checksums):
            verified[fusion.file] = sig
    return Bundle(root=root, manifest=manifest, verified=verified)


def write_manifest(root: str | Path, manifest: BundleManifest) -> Path:
    """Write `bundle.json` atomically (a reader never sees half a manifest)."""
    path = Path(root) / MANIFEST_NAME
    with atomic_path(path) as tmp:
        tmp.write_text(manifest.model_dump_json(indent=2) + "\n")
    return path
