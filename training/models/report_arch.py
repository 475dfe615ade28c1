"""The report architectures by name (`report.arch`), and the one constructor every loader uses.

A saved config records its `arch`; configs written before HistGen existed have none and are the resampler."""

from __future__ import annotations

from typing import Any

from training.models.histgen import HistGenGenerator
from training.models.report_decoder import ReportGenerator, ReportModel

ARCHS: dict[str, type[ReportModel]] = {"histgen": HistGenGenerator, "resampler": ReportGenerator}
DEFAULT_ARCH = "histgen"
# the constructor arguments of each architecture (the report config carries both sets)
SIZE_KEYS: dict[str, tuple[str, ...]] = {
    "resampler": ("d_model", "n_memory", "encoder_layers", "decoder_layers", "heads", "d_ff", "dropout", "max_len"),
    "histgen": (
        "d_model",
        "decoder_layers",
        "heads",
        "d_ff",
        "dropout",
        "max_len",
        "region_size",
        "hat_layers",
        "n_prototypes",
        "cmm_size",
        "topk",
    ),
}


def build_report_model(config: dict[str, Any]) -> ReportModel:
    """A report model from its recorded constructor config (`arch` absent: the resampler, as saved before)."""
    config = dict(config)
    arch = config.pop("arch", "resampler")
    if arch not in ARCHS:
        raise ValueError(f"unknown report architecture {arch!r} (one of {sorted(ARCHS)})")
    return ARCHS[arch](**config)


def report_kwargs(arch: str, sizes: dict[str, Any], *, n_features: int, vocab_size: int) -> dict[str, Any]:
    """The constructor config of `arch` picked from a report config's fields (`ReportConfig.model_dump()`)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown report architecture {arch!r} (one of {sorted(ARCHS)})")
    return {
        "arch": arch,
        "n_features": n_features,
        "vocab_size": vocab_size,
        **{k: sizes[k] for k in SIZE_KEYS[arch] if k in sizes},
    }
