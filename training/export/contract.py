"""The `export.pt` contract: what a training run leaves for `mstar export` (`save_export_checkpoint` writes it,
`load_export_checkpoint` rebuilds its models, each from its recorded sizes):
`RUN_DIR/export.pt` = {
  "format": "mstar-export/1",
  "patch_encoder": {"name": <key of patch_encoder.PATCH_ENCODERS>, "state_dict": {...} | None},
  "target_mpp": float,
  "field_um": float | None (µm per patch side; absent in older files: patch size x target_mpp),
  "aggregator": {"kwargs": TransMIL kwargs, "state_dict": {...}} | None,
  "heads": [{"name", "task": "classification"|"survival", "kind": "abmil"|"transmil"|"transmil_pre",
             "n_outputs", "dim", "transmil_kwargs", "labels", "bin_edges", "state_dict"}],
  "text": {"model_dir", "max_length", "proj_state_dict": {...}, "bert_state_dict": {...} | None} | None,
  "zeroshot": a `ZeroShotSpec` dict (method, logit_scale, topk: what a zero-shot run chose on validation) | None
              (older files: under "text"; absent: the bundle gets the official defaults),
  "report": {"kwargs": model config (`arch`; none = resampler), "state_dict": {...}, "itos": [vocabulary]} | None,
  "provenance": {"run_id", "config_hash", "git_commit", ...}, "demo": bool, "name": str,
}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from service.errors import BundleError, InvalidParameterError
from service.inference.bundle import ZeroShotSpec
from training.models.heads import MILHead
from training.models.patch_encoder import PATCH_ENCODERS, Preprocessing, build_patch_encoder
from training.models.report_arch import build_report_model
from training.models.report_decoder import ReportModel
from training.models.transmil import TransMIL

EXPORT_FORMAT = "mstar-export/1"
EXPORT_FILE = "export.pt"
_TRANSMIL_SIZE_KEYS = ("heads", "num_landmarks", "pinv_iterations", "dim_head")


def encoder_head_row(name: str, path: str | Path, width: int) -> dict:
    """`head_row` of a saved head (`mstar train downstream` head.pt, or an official TransMIL classifier) that must
    read the encoder's `width`-d features: a head trained on other features is refused naming both widths."""
    from training.checkpoints import load_any_head

    module, meta = load_any_head(path)
    if module.config["n_features"] != width:
        raise BundleError(
            f"head {name!r} ({path}) reads {module.config['n_features']}-d features, the encoder gives {width}"
        )
    return head_row(name, module, meta)


def head_row(name: str, module: MILHead, meta: dict) -> dict:
    """A saved classification/survival head (`training.checkpoints.load_head`) as `save_export_checkpoint` takes it:
    its constructor sizes, and labels or survival bin edges from its `meta`."""
    config = module.config
    row = {
        "name": name,
        "module": module,
        "task": config["task"],
        "n_outputs": config["n_outputs"],
        "dim": config["dim"],
        "kind": config["kind"],
    }
    if config["kind"] != "abmil":
        row["transmil_kwargs"] = {k: module.mil.config[k] for k in _TRANSMIL_SIZE_KEYS}
    if config["task"] == "classification":
        row["labels"] = meta["labels"]
    else:
        row["bin_edges"] = [float(b) for b in meta["bin_edges"]]
    return row


def save_export_checkpoint(
    path: str | Path,
    *,
    encoder_name: str,
    encoder_state: dict | None = None,
    target_mpp: float = 0.5,
    field_um: float | None = None,
    aggregator=None,
    heads: list[dict[str, Any]] | None = None,
    text: dict[str, Any] | None = None,
    report: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
    demo: bool = False,
    name: str = "mstar",
    zeroshot: ZeroShotSpec | dict[str, Any] | str | Path | None = None,
) -> Path:
    """Write the file `mstar export` reads. `aggregator`: a `TransMIL` (its config is recorded); `heads`: rows of
    `head_row` (a `MILHead` plus name/task/n_outputs/labels/bin_edges and its constructor sizes); `zeroshot`: the
    zero-shot method to serve, a spec or the directory of the zero-shot run that chose it on validation (its k and
    logit scale then reach the bundle manifest; see `zeroshot_from_run`)."""
    zs = resolve_zeroshot(zeroshot)
    if zs is not None and text is None:
        raise InvalidParameterError("a zero-shot method was given but there is no text encoder to score prompts with")
    agg = None
    if aggregator is not None:
        agg = {"kwargs": _transmil_kwargs(aggregator), "state_dict": aggregator.state_dict()}
    head_rows = []
    for h in heads or []:
        row = {k: v for k, v in h.items() if k != "module"}
        row["state_dict"] = h["module"].state_dict()
        row.setdefault("kind", h["module"].kind)
        head_rows.append(row)
    ckpt = {
        "format": EXPORT_FORMAT,
        "name": name,
        "patch_encoder": {"name": encoder_name, "state_dict": encoder_state},
        "target_mpp": float(target_mpp),
        "field_um": None if field_um is None else float(field_um),
        "aggregator": agg,
        "heads": head_rows,
        "text": _text_entry(text),
        "report": None
        if report is None
        else {"kwargs": report["kwargs"], "state_dict": report["module"].state_dict(), "itos": list(report["itos"])},
        "zeroshot": zs,
        "provenance": provenance or {},
        "demo": demo,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def _text_entry(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """`{"module": TextEncoder, "proj": nn.Linear}` -> the stored form (weights, not modules)."""
    if text is None or "module" not in text:
        return text
    enc = text["module"]
    proj = text["proj"]
    return {
        "model_dir": enc.model_dir,
        "max_length": enc.max_length,
        "proj_config": {"in_features": proj.in_features, "out_features": proj.out_features},
        "bert_state_dict": enc.bert.state_dict(),
        "proj_state_dict": text["proj"].state_dict(),
        # the zero-shot method a validation run chose (a `ZeroShotSpec` dict, e.g. the zero-shot run's
        # `meta["zeroshot"]`); absent: the bundle gets the official defaults
        "zeroshot": text.get("zeroshot"),
    }


def zeroshot_from_run(run_dir: str | Path) -> dict[str, Any]:
    """The `ZeroShotSpec` a `mstar train downstream` zero-shot run selected on validation (`head.pt` meta
    `zeroshot`: method, logit scale and the top-k with the best validation balanced accuracy), validated."""
    run_dir = Path(run_dir)
    path = run_dir / "head.pt" if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise InvalidParameterError(f"{run_dir} is not a zero-shot run directory (no head.pt)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unreadable / foreign pickle
        raise InvalidParameterError(f"cannot read zero-shot run {path}: {err}") from err
    meta = saved.get("meta") if isinstance(saved, dict) else None
    if not isinstance(meta, dict) or meta.get("task") != "zeroshot":
        task = meta.get("task") if isinstance(meta, dict) else None
        raise InvalidParameterError(f"{path} is not from a zero-shot run (task {task!r})")
    if not isinstance(meta.get("zeroshot"), dict):
        raise InvalidParameterError(f"{path} records no selected zero-shot method (written before it was recorded)")
    return resolve_zeroshot(meta["zeroshot"])


def resolve_zeroshot(given: ZeroShotSpec | dict[str, Any] | str | Path | None) -> dict[str, Any] | None:
    """A zero-shot method as export.pt stores it (a checked `ZeroShotSpec` dict): from a spec, a dict, or a
    zero-shot run directory / its head.pt."""
    if given is None:
        return None
    if isinstance(given, str | Path):
        return zeroshot_from_run(given)
    if isinstance(given, ZeroShotSpec):
        return given.model_dump()
    try:
        return ZeroShotSpec(**given).model_dump()
    except (TypeError, ValueError) as err:
        raise InvalidParameterError(f"invalid zero-shot method {given}: {err}") from err


def _transmil_kwargs(agg: TransMIL) -> dict[str, Any]:
    """The sizes of the aggregator as the contract stores them (from its recorded config)."""
    return {k: agg.config[k] for k in ("n_features", "dim", "heads", "dim_head", "num_landmarks", "pinv_iterations")}


@dataclass
class HeadEntry:
    """A head of an export checkpoint, rebuilt."""

    name: str
    module: MILHead
    task: str
    n_outputs: int
    labels: list[str] | None = None
    bin_edges: list[float] | None = None


@dataclass
class ExportContents:
    """The models of an `export.pt`, rebuilt from their recorded sizes and loaded strictly."""

    path: Path
    encoder: nn.Module
    preprocessing: Preprocessing
    embed_dim: int
    target_mpp: float
    field_um: float | None = None
    aggregator: TransMIL | None = None
    heads: list[HeadEntry] = field(default_factory=list)
    text_encoder: nn.Module | None = None
    text_proj: nn.Linear | None = None
    tokenizer_dir: str | None = None
    zeroshot: dict[str, Any] | None = None
    report: ReportModel | None = None
    report_itos: list[str] | None = None
    name: str = "mstar"
    demo: bool = False
    provenance: dict[str, Any] = field(default_factory=dict)


def load_export_checkpoint(run_dir: str | Path) -> ExportContents:
    """Read `RUN_DIR/export.pt` (or the file itself) and rebuild its models."""
    run_dir = Path(run_dir)
    path = run_dir / EXPORT_FILE if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise InvalidParameterError(
            f"{run_dir} has no {EXPORT_FILE} (written by training through save_export_checkpoint)"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unreadable / foreign pickle
        raise InvalidParameterError(f"cannot read export checkpoint {path}: {err}") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != EXPORT_FORMAT:
        raise InvalidParameterError(f"{path} is not an {EXPORT_FORMAT} checkpoint")
    enc_name = ckpt["patch_encoder"]["name"]
    encoder, pre = build_patch_encoder(enc_name)
    if ckpt["patch_encoder"].get("state_dict"):
        encoder.load_state_dict(ckpt["patch_encoder"]["state_dict"], strict=True)
    out = ExportContents(
        path,
        encoder,
        pre,
        PATCH_ENCODERS[enc_name].embed_dim,
        float(ckpt["target_mpp"]),
        None if ckpt.get("field_um") is None else float(ckpt["field_um"]),
        name=ckpt.get("name", "mstar"),
        demo=bool(ckpt.get("demo")),
        provenance=dict(ckpt.get("provenance") or {}),
    )
    if ckpt.get("aggregator"):
        out.aggregator = TransMIL(**ckpt["aggregator"]["kwargs"])
        out.aggregator.load_state_dict(ckpt["aggregator"]["state_dict"], strict=True)
    for h in ckpt.get("heads") or []:
        # a head reads the patch encoder's features: its input width is the encoder's
        module = MILHead(
            h["kind"],
            out.embed_dim,
            int(h["n_outputs"]),
            task=h["task"],
            dim=int(h.get("dim", 512)),
            transmil_kwargs=h.get("transmil_kwargs"),
        )
        if "feature_mean" in h["state_dict"]:  # the head standardises its input as Stage 1 did
            module.set_standardization(h["state_dict"]["feature_mean"], h["state_dict"]["feature_std"])
        module.load_state_dict(h["state_dict"], strict=True)
        out.heads.append(
            HeadEntry(h["name"], module.eval(), h["task"], int(h["n_outputs"]), h.get("labels"), h.get("bin_edges"))
        )
    if ckpt.get("text"):
        from training.models.text_encoder import TextEncoder  # transformers: only for a text tower

        t = ckpt["text"]
        out.text_encoder = TextEncoder(t["model_dir"], max_length=int(t.get("max_length", 128)))
        if t.get("bert_state_dict"):
            out.text_encoder.bert.load_state_dict(t["bert_state_dict"], strict=True)
        proj_config = t.get("proj_config")
        if proj_config is None:  # written before proj_config was recorded: MStar's text width -> slide width
            if out.aggregator is None:
                raise InvalidParameterError(f"{path}: a text tower without proj_config needs the aggregator")
            proj_config = {"in_features": out.text_encoder.hidden_size, "out_features": out.aggregator.dim}
        out.text_proj = nn.Linear(**proj_config)
        out.text_proj.load_state_dict(t["proj_state_dict"], strict=True)
        out.zeroshot = ckpt.get("zeroshot") or t.get("zeroshot")  # older files: under "text"
        out.tokenizer_dir = t["model_dir"]
    if ckpt.get("report"):
        r = ckpt["report"]
        out.report = build_report_model(r["kwargs"]).eval()
        out.report.load_state_dict(r["state_dict"], strict=True)
        out.report_itos = list(r["itos"])
    return out
