"""Training configurations: pydantic models loaded from YAML or TOML files.

Every open point of the method reference (§7) is a field here with its documented default; unpublished
optimisation settings follow the reference's §9 [ASSUME] values.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import click
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from service.errors import InvalidParameterError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    cohort: Path = Field(description="cohort.csv (case_id, slide_id, cancer_type, split)")
    features_dir: Path = Field(description="directory of <slide_id>.h5 feature files")
    reports: Path | None = Field(None, description="reports.jsonl; default <cohort dir>/reports.jsonl")
    rna: Path | None = Field(None, description="genes x cases CSV; default <cohort dir>/rna/expression.csv")
    n_patches: int = Field(4096, ge=1, description="patches per slide, sampled/repeated (§1.1, §7.5)")
    standardize: bool = Field(
        False,
        description="z-score feature dims with train statistics (saved in the checkpoint); off = raw features as "
        "in mSTAR (UNI features are well scaled), on for hand-made features of very different scales",
    )
    train_split: str = "train"
    val_split: str = "val"
    num_workers: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _defaults(self) -> DataConfig:
        root = self.cohort.parent
        if self.reports is None:
            self.reports = root / "reports.jsonl"
        if self.rna is None:
            self.rna = root / "rna" / "expression.csv"
        return self


class AggregatorConfig(_Strict):
    dim: int = Field(512, ge=1, description="shared embedding width; TransMIL width")
    heads: int = Field(8, ge=1)
    dim_head: int | None = Field(None, ge=1, description="default dim // heads (64)")
    num_landmarks: int | None = Field(None, ge=1, description="default dim // 2 (256)")
    pinv_iterations: int = Field(6, ge=1)
    fc_dropout: float = Field(0.25, ge=0, lt=1)
    attn_dropout: float = Field(0.1, ge=0, lt=1)


class TinyBertConfig(_Strict):
    """A small random BERT whose WordPiece vocabulary is trained on the training reports (fast CPU runs)."""

    vocab_size: int = Field(1000, ge=1)
    hidden: int = Field(64, ge=1)
    layers: int = Field(2, ge=1)
    heads: int = Field(2, ge=1)


class TextConfig(_Strict):
    enabled: bool = True
    model_dir: Path | None = Field(None, description="local HF model directory; default: packaged MiniLM-L6")
    tiny_bert: TinyBertConfig | None = Field(
        None, description="instead of model_dir: build a tiny BERT from the training reports into <out_dir>"
    )
    max_length: int = Field(512, ge=8)
    lr: float = Field(1e-5, ge=0, description="lower lr for the pretrained language model (§9 ASSUME)")
    freeze: bool = False


class GeneConfig(_Strict):
    enabled: bool = True
    n_bins: int = Field(5, ge=1, description="scBERT bin count (§7.6)")
    binning: Literal["scbert", "quantile"] = Field(
        "quantile", description="scbert = floor+clip of log1p(RSEM); quantile = per-gene train quantiles"
    )
    dim: int = Field(200, ge=1)
    depth: int = Field(1, ge=1, description="Performer depth; ~1 layer matches the 0.94M count (§1.4)")
    heads: int = Field(10, ge=1)
    dim_head: int = Field(64, ge=1)
    gene2vec: Path | None = Field(None, description="Gene2Vec text table; absent -> learned gene embedding")
    freeze_gene2vec: bool = True


class ModelConfig(_Strict):
    aggregator: AggregatorConfig = AggregatorConfig()
    text: TextConfig = TextConfig()
    gene: GeneConfig = GeneConfig()
    init_temperature: float = Field(0.07, gt=0)
    learn_temperature: bool = True


class LossConfig(_Strict):
    slide_report: float = 1.0
    slide_rna: float = 1.0
    report_rna: float = 1.0
    triplet: float = 1.0
    margin: float = Field(0.3, ge=0)


class OptimConfig(_Strict):
    epochs: int = Field(50, ge=1)
    batch_size: int = Field(128, ge=2, description="global batch (all ranks together)")
    per_class: int = Field(4, description="patients per cancer type chunk in a batch (triplet positives)")
    lr: float = Field(1e-4, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.98)
    warmup_frac: float = Field(0.05, ge=0, le=1)
    # a negative clip norm flips the gradient's sign (clip_grad_norm_ scales by max_norm / norm): gradient ascent
    grad_clip: float | None = Field(1.0, gt=0, description="max gradient norm; null: no clipping")
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps (tests, smoke runs)")

    @model_validator(mode="after")
    def _batch(self) -> OptimConfig:
        if self.per_class < 2 or self.batch_size % self.per_class:
            raise ValueError("batch_size must be a multiple of per_class (>= 2)")
        return self


class EvalConfig(_Strict):
    knn_k: int = Field(5, ge=1)
    recall_at: list[Annotated[int, Field(ge=1)]] = Field([1, 5, 10], min_length=1)
    every_epochs: int = Field(1, ge=1)


class Stage1Config(_Strict):
    data: DataConfig
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    eval: EvalConfig = EvalConfig()
    out_dir: Path = Path("runs/stage1")
    seed: int = 0
    amp: bool = Field(True, description="bf16 autocast, only when running on CUDA")
    checkpoint_every: int = Field(0, ge=0, description="also checkpoint every N steps (0: at epoch ends only)")
    tensorboard: bool = False
    num_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads; 1 is much faster on an oversubscribed CPU (OpenMP spin-waits)"
    )


def parse_set_options(ctx: click.Context | None, param: click.Parameter | None, items: tuple[str, ...]) -> dict:
    """`--set KEY=VALUE ...` (a click callback) -> {dotted key: value}; a value is parsed as JSON when it can be
    (numbers, booleans, null, lists), otherwise kept as text (paths, names)."""
    parsed: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--set")
        key, value = item.split("=", 1)
        try:
            parsed[key] = json.loads(value)
        except ValueError:
            parsed[key] = value
    return parsed


def load_config(path: str | Path, model: type[BaseModel] = Stage1Config, overrides: dict | None = None):
    """Parse a YAML/TOML file into `model`; relative paths are resolved against the file's directory."""
    path = Path(path)
    if not path.is_file():
        raise InvalidParameterError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        raw = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as err:
        raise InvalidParameterError(f"{path}: cannot parse: {err}") from err
    if not isinstance(raw, dict):
        raise InvalidParameterError(f"{path}: expected a mapping at the top level")
    for key, value in (overrides or {}).items():
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        cfg = model.model_validate(raw)
    except ValidationError as err:
        # one line, as every refusal prints: `field.path: message` per problem, without pydantic's links
        problems = "; ".join(
            f"{'.'.join(str(part) for part in e['loc']) or '(top level)'}: {e['msg']}" for e in err.errors()
        )
        raise InvalidParameterError(f"{path}: invalid config: {problems}") from err
    return _resolve_paths(cfg, path.parent.resolve())


def _resolve_paths(cfg: BaseModel, base: Path) -> BaseModel:
    for name in type(cfg).model_fields:
        value = getattr(cfg, name)
        if isinstance(value, Path) and not value.is_absolute():
            setattr(cfg, name, (base / value).resolve())
        elif isinstance(value, BaseModel):
            _resolve_paths(value, base)
    return cfg
