"""`mstar export-runs`: one bundle from the runs `mstar train` leaves, without a hand-written `export.pt`.

A researcher's chain is Stage 2 (`student_backbone.pt`, its sidecar naming the architecture and the field of view
it was trained at), Stage 1 (`last.pt`: the slide aggregator, its feature standardisation, and the text tower that
zero-shot scores prompts with) and downstream heads (`head.pt` of classification, survival, report runs). `mstar
export RUN_DIR` reads only an `export.pt`, which only the demo build wrote; `assemble_export` writes that file from
the runs, checking that every piece reads the encoder's features, and `export_runs` exports it.
"""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from service.errors import InvalidParameterError
from service.inference.bundle import sha256_file
from training.checkpoints import load_report_generator, load_stage1
from training.export.bundle import ExportReport, export_run
from training.export.contract import EXPORT_FILE, encoder_head_row, save_export_checkpoint
from training.models.patch_encoder import PATCH_ENCODERS, build_patch_encoder


def fold_standardization(aggregator: torch.nn.Module, mean: torch.Tensor, std: torch.Tensor) -> torch.nn.Module:
    """A copy of a TransMIL whose input Linear absorbs `(x - mean) / std`, so the exported graph takes raw features.

    W((x - m) / s) + b = (W / s) x + (b - W (m / s)): exact, and keeps the official parameter layout."""
    agg = copy.deepcopy(aggregator)
    fc = agg._fc1[0] if isinstance(agg._fc1, torch.nn.Sequential) else agg._fc1
    with torch.no_grad():
        scale = 1.0 / std.to(fc.weight.dtype)
        fc.bias.sub_(fc.weight @ (mean.to(fc.weight.dtype) * scale))
        fc.weight.mul_(scale[None, :])
    return agg


def _sidecar(encoder: Path) -> dict[str, Any]:
    path = encoder.with_suffix(encoder.suffix + ".json")
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except ValueError as err:
        raise InvalidParameterError(f"{path}: not JSON: {err}") from err
    return meta if isinstance(meta, dict) else {}


def _source(path: Path) -> dict[str, str]:
    return {"file": path.name, "sha256": sha256_file(path)}


def assemble_export(
    run_dir: str | Path,
    *,
    encoder: str | Path,
    arch: str | None = None,
    stage1: str | Path | None = None,
    heads: Sequence[tuple[str, str | Path]] = (),
    report: str | Path | None = None,
    target_mpp: float | None = None,
    field_um: float | None = None,
    name: str = "mstar",
    provenance: dict[str, Any] | None = None,
    demo: bool = False,
) -> Path:
    """Write `RUN_DIR/export.pt` from training outputs; returns its path.

    `encoder`: patch-encoder weights (Stage 2's `student_backbone.pt`, whose sidecar names `arch` and the
    `target_mpp`/`field_um` it was trained at; or a released ViT file with `arch`). `stage1`: a Stage-1 `last.pt`
    (aggregator, its standardisation folded into the first layer, and its text tower if it has one). `heads`:
    `(name, head.pt)` classification/survival heads; `report`: a report-generation `head.pt`. Every piece must read
    the encoder's feature width (and the heads the aggregator's, where they were trained on slide embeddings)."""
    encoder = Path(encoder)
    if not encoder.is_file():
        raise InvalidParameterError(f"encoder weights not found: {encoder}")
    meta = _sidecar(encoder)
    arch = arch or meta.get("arch")
    if not arch:
        raise InvalidParameterError(f"{encoder} has no sidecar {encoder.name}.json naming its architecture: use --arch")
    if arch not in PATCH_ENCODERS:
        raise InvalidParameterError(f"unknown architecture {arch!r}; choose one of {sorted(PATCH_ENCODERS)}")
    spec = PATCH_ENCODERS[arch]
    width = spec.embed_dim
    patch_encoder, _ = build_patch_encoder(arch, encoder)  # loaded strictly: weights of another architecture refused
    target_mpp = float(target_mpp or meta.get("target_mpp") or 0.5)
    field_um = field_um or meta.get("field_um") or spec.field_um
    sources: dict[str, Any] = {"encoder": {**_source(encoder), "arch": arch}}

    aggregator = text = None
    if stage1 is not None:
        enc = load_stage1(stage1, with_text=True)
        got = int(enc.vision.aggregator.config["n_features"])
        if got != width:
            raise InvalidParameterError(
                f"Stage-1 aggregator {stage1} reads {got}-d features, the encoder gives {width}"
            )
        aggregator = enc.vision.aggregator
        if enc.vision.feature_mean is not None:
            aggregator = fold_standardization(aggregator, enc.vision.feature_mean, enc.vision.feature_std)
        if enc.text is not None:
            text = {"module": enc.text, "proj": enc.proj_text}
        sources["stage1"] = _source(Path(stage1))

    rows = []
    for head_name, path in heads:
        rows.append(encoder_head_row(head_name, path, width))
        sources.setdefault("heads", {})[head_name] = _source(Path(path))

    report_entry = None
    if report is not None:
        generator, kwargs, itos = load_report_generator(report)
        if int(kwargs["n_features"]) != width:
            raise InvalidParameterError(
                f"report generator {report} reads {kwargs['n_features']}-d features, the encoder gives {width}"
            )
        report_entry = {"module": generator, "kwargs": kwargs, "itos": itos}
        sources["report"] = _source(Path(report))

    # named by the bundle, not by the scratch folder export.pt is written to: two exports write the same manifest
    prov = {"source": "mstar export-runs", "run_id": name, "inputs": sources, **(provenance or {})}
    return save_export_checkpoint(
        Path(run_dir) / EXPORT_FILE,
        encoder_name=arch,
        encoder_state=patch_encoder.state_dict(),
        target_mpp=target_mpp,
        field_um=float(field_um) if field_um else None,
        aggregator=aggregator,
        heads=rows,
        text=text,
        report=report_entry,
        provenance=prov,
        demo=demo,
        name=name,
    )


def export_runs(
    out: str | Path,
    *,
    zeroshot_run: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    **pieces: Any,
) -> ExportReport:
    """`assemble_export` into a scratch folder beside `out`, then `export_run` it into `out` (a failed export leaves
    `out`'s previous bundle as it was)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.runs-", dir=out.parent) as scratch:
        assemble_export(scratch, **pieces)
        return export_run(scratch, out, zeroshot_run=zeroshot_run, progress=progress)
