"""The configuration of a downstream run (`mstar train downstream --config FILE`): one task and its settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from training.config import load_config

Task = Literal["classification", "survival", "report", "zeroshot", "fewshot", "retrieval"]


class ReportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # "histgen": the paper's HistGen (local-global hierarchical encoder + cross-modal context module,
    # training/models/histgen.py); "resampler": the earlier learned-query resampler (training/models/report_decoder.py)
    arch: Literal["histgen", "resampler"] = "histgen"
    d_model: int = 512
    decoder_layers: int = 3
    # histgen only (official sizes): region of region_size - 1 patches + a region token, HAT layers,
    # prototypes sampled for the visual memory query, memory slots, slots kept per query
    region_size: int = 96
    hat_layers: int = 2
    n_prototypes: int = 512
    cmm_size: int = 2048
    topk: int = 512
    # resampler only
    n_memory: int = 64
    encoder_layers: int = 1
    heads: int = 8
    d_ff: int = 512
    dropout: float = 0.1
    max_len: int = 100
    min_freq: int = 3
    beam: int = 3
    batch_size: int = 8
    lr: float = 1e-4
    # "step": HistGen's StepLR (x gamma every epoch), tuned for ~7k reports per epoch; on a small cohort an
    # epoch is a few steps and it freezes the decoder long before it fits. "cosine" anneals over all epochs.
    schedule: Literal["step", "cosine"] = "step"
    gamma: float = 0.8
    val_beam: int = 1  # greedy on val for model selection speed; beam on test
    # validate (greedy-decode the val split, the costliest part of an epoch on a small cohort) every `val_every`
    # epochs and at the last; model selection then picks among those epochs
    val_every: int = Field(1, ge=1)
    meteor: bool = True  # METEOR starts a Java process (slow); BLEU/ROUGE-L always


class DownstreamConfig(BaseModel):
    """A downstream run, read from YAML. Relative paths are relative to the YAML file."""

    model_config = ConfigDict(extra="forbid")
    task: Task
    cohort: Path
    features_dir: Path
    out_dir: Path = Path("runs/downstream")
    reports: Path | None = None
    label_column: str = "cancer_type"
    time_column: str = "survival_months"
    event_column: str = "event"
    aggregator: Literal["abmil", "transmil", "transmil_pre"] = "abmil"
    stage1_checkpoint: Path | None = None
    # Stage-2 checkpoint holding `proj` (1024->512), for patch-level zero-shot
    patch_proj: Path | None = None
    transmil: dict[str, Any] = Field(default_factory=dict)
    dim: int = Field(512, ge=1)
    dropout: float = Field(0.25, ge=0, lt=1)
    epochs: int = Field(50, ge=1)
    # per parameter group, which torch does not check: a negative lr trained "successfully" away from the labels
    lr: float = Field(2e-4, ge=0)
    lr_pretrained: float = Field(2e-5, ge=0)
    weight_decay: float = Field(1e-5, ge=0)
    max_patches: int | None = Field(4096, ge=1)  # random subset per training step; evaluation uses every patch
    n_bins: int = Field(4, ge=1)
    # survival, two documented deviations from the official code (docs/downstream.md): the hazard layer starts at
    # the training split's marginal hazards ("marginal"; official: "random"), and the kept epoch has the lowest
    # validation NLL ("val_nll"; official: the highest validation C-index, "val_c_index")
    survival_init: Literal["marginal", "random"] = "marginal"
    survival_selection: Literal["val_nll", "val_c_index"] = "val_nll"
    n_boot: int = Field(1000, ge=5)  # bootstrap resamples of the confidence intervals (0 gave NaN intervals)
    seed: int = 1
    # multimodal (classification and survival; docs/downstream.md, "Slide + RNA-Seq"): with "rna" in modalities,
    # or with `rna` set, the task trains a Porpoise-style fusion head on the cases that have RNA (complete cases)
    modalities: list[Literal["wsi", "rna"]] = Field(default_factory=lambda: ["wsi"])
    rna: Path | None = None  # a genes x cases matrix, or a folder of per-case profiles `<case_id>.{csv,tsv,txt}`
    fusion: Literal["gated_concat", "kronecker", "mcat"] = "gated_concat"
    mcat_groups: int = Field(6, ge=1)  # mcat: gene groups (contiguous blocks of the gene list), MCAT used 6
    # mcat: MCAT's signatures.csv layout (one column per group, header = group names, cells = genes); overrides
    # mcat_groups with those groups, restricted to the head's gene list
    mcat_signatures: Path | None = None
    rna_encoder: Literal["snn", "stage1"] = "snn"  # stage1: the Stage-1 gene encoder (needs stage1_checkpoint)
    rna_min_coverage: float = Field(0.5, ge=0, le=1)
    report: ReportConfig = Field(default_factory=ReportConfig)
    prompts: Path | None = None
    topk: list[int] = Field(default_factory=lambda: [1, 5, 10, 50, 100])
    shots: list[int] | None = None
    fewshot_repeats: int = Field(5, ge=1)
    # patch_prototype (official §3.5) needs stage1_checkpoint (+ prompts); skipped without one unless listed here
    fewshot_methods: list[Literal["prototype", "linear_probe", "patch_prototype"]] = Field(
        default_factory=lambda: ["prototype", "linear_probe", "patch_prototype"]
    )
    recall_ks: list[int] = Field(default_factory=lambda: [1, 5, 10])

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> DownstreamConfig:
        """Read a YAML/TOML file through the common loader (`training.config.load_config`); `overrides` that are
        not None replace top-level fields, and relative paths resolve against the file's folder."""
        return load_config(path, cls, overrides={k: v for k, v in overrides.items() if v is not None})
