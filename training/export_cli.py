"""`mstar export RUN_DIR --out DIR` and `mstar import-encoder CHECKPOINT --out DIR`.

The export checkpoint contract (what a training run leaves for export; written by `save_export_checkpoint`):
`RUN_DIR/export.pt` = {
  "format": "mstar-export/1",
  "patch_encoder": {"name": <key of patch_encoder.PATCH_ENCODERS>, "state_dict": {...} | None},
  "target_mpp": float,
  "aggregator": {"kwargs": TransMIL kwargs, "state_dict": {...}} | None,
  "heads": [{"name", "task": "classification"|"survival", "kind": "abmil"|"transmil"|"transmil_pre",
             "n_outputs", "dim", "transmil_kwargs", "labels", "bin_edges", "state_dict"}],
  "text": {"model_dir", "max_length", "proj_state_dict": {...}, "bert_state_dict": {...} | None} | None,
  "report": {"kwargs": ReportGenerator kwargs, "state_dict": {...}, "itos": [vocabulary]} | None,
  "provenance": {"run_id", "config_hash", "git_commit", ...}, "demo": bool, "name": str,
}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from service.errors import BundleError, InvalidParameterError

EXPORT_FORMAT = "mstar-export/1"
EXPORT_FILE = "export.pt"


def save_export_checkpoint(
    path: str | Path,
    *,
    encoder_name: str,
    encoder_state: dict | None = None,
    target_mpp: float = 0.5,
    aggregator=None,
    heads: list[dict[str, Any]] | None = None,
    text: dict[str, Any] | None = None,
    report: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
    demo: bool = False,
    name: str = "mstar",
) -> Path:
    """Write the file `mstar export` reads. `aggregator`: a `TransMIL` (its sizes are recorded);
    `heads`: dicts with `module` (a `MILHead`) plus name/task/n_outputs/labels/bin_edges and the
    constructor sizes (`dim`, `transmil_kwargs`)."""
    import torch

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
        "aggregator": agg,
        "heads": head_rows,
        "text": _text_entry(text),
        "report": None
        if report is None
        else {"kwargs": report["kwargs"], "state_dict": report["module"].state_dict(), "itos": list(report["itos"])},
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
    return {
        "model_dir": enc.model_dir,
        "max_length": enc.max_length,
        "bert_state_dict": enc.bert.state_dict(),
        "proj_state_dict": text["proj"].state_dict(),
    }


def _transmil_kwargs(agg) -> dict[str, Any]:
    layer = agg.layer1.attn
    return {
        "n_features": agg.n_features,
        "dim": agg.dim,
        "heads": layer.heads,
        "dim_head": agg.layer1.attn.to_qkv.out_features // 3 // layer.heads,
        "num_landmarks": layer.num_landmarks,
        "pinv_iterations": layer.pinv_iterations,
    }


def export_run(run_dir: str | Path, out: str | Path, *, progress=None):
    """Rebuild the models of a training run from `RUN_DIR/export.pt` and export them into a bundle."""
    import torch

    from training.export import HeadSpec, build_bundle
    from training.models.heads import MILHead
    from training.models.patch_encoder import PATCH_ENCODERS, build_patch_encoder
    from training.models.transmil import TransMIL

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
    embed_dim = PATCH_ENCODERS[enc_name].embed_dim
    aggregator = slide_dim = None
    if ckpt.get("aggregator"):
        aggregator = TransMIL(**ckpt["aggregator"]["kwargs"])
        aggregator.load_state_dict(ckpt["aggregator"]["state_dict"], strict=True)
        slide_dim = aggregator.dim
    heads = []
    for h in ckpt.get("heads") or []:
        module = MILHead(
            h["kind"],
            embed_dim,
            int(h["n_outputs"]),
            task=h["task"],
            dim=int(h.get("dim", 512)),
            transmil_kwargs=h.get("transmil_kwargs"),
        )
        if "feature_mean" in h["state_dict"]:  # the head standardises its input as Stage 1 did
            module.set_standardization(h["state_dict"]["feature_mean"], h["state_dict"]["feature_std"])
        module.load_state_dict(h["state_dict"], strict=True)
        heads.append(
            HeadSpec(h["name"], module.eval(), h["task"], int(h["n_outputs"]), h.get("labels"), h.get("bin_edges"))
        )
    text_encoder = text_proj = tok_dir = None
    if ckpt.get("text"):
        from torch import nn

        from training.models.text_encoder import TextEncoder

        t = ckpt["text"]
        text_encoder = TextEncoder(t["model_dir"], max_length=int(t.get("max_length", 128)))
        if t.get("bert_state_dict"):
            text_encoder.bert.load_state_dict(t["bert_state_dict"], strict=True)
        w = t["proj_state_dict"]["weight"]
        text_proj = nn.Linear(w.shape[1], w.shape[0])
        text_proj.load_state_dict(t["proj_state_dict"], strict=True)
        tok_dir = t["model_dir"]
    report_gen = report_itos = None
    if ckpt.get("report"):
        from training.models.report_decoder import ReportGenerator

        r = ckpt["report"]
        report_gen = ReportGenerator(**r["kwargs"]).eval()
        report_gen.load_state_dict(r["state_dict"], strict=True)
        report_itos = r["itos"]
    prov = dict(ckpt.get("provenance") or {})
    prov.setdefault("run_id", run_dir.name)
    prov.setdefault("checkpoint", str(path))
    return build_bundle(
        out,
        encoder=encoder,
        patch_size=pre.size,
        embed_dim=embed_dim,
        target_mpp=float(ckpt["target_mpp"]),
        mean=pre.mean,
        std=pre.std,
        aggregator=aggregator,
        slide_dim=slide_dim,
        heads=heads,
        text_encoder=text_encoder,
        text_proj=text_proj,
        tokenizer_dir=tok_dir,
        report_generator=report_gen,
        report_vocab=report_itos,
        name=ckpt.get("name", "mstar"),
        demo=bool(ckpt.get("demo")),
        provenance=prov,
        progress=progress,
    )


def import_encoder(
    checkpoint: str | Path,
    out: str | Path,
    *,
    arch: str = "mstar_vit_l16",
    target_mpp: float = 0.5,
    name: str | None = None,
    progress=None,
):
    """A bundle around a released ViT checkpoint (mSTAR/UNI: a plain timm state dict; a
    `{'model_state_dict': ...}` wrapper and DDP `module.` prefixes are accepted). Loaded strictly."""
    from service.inference.bundle import sha256_file
    from training.export import build_bundle
    from training.models.patch_encoder import PATCH_ENCODERS, build_patch_encoder

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise BundleError(f"checkpoint not found: {checkpoint}")
    encoder, pre = build_patch_encoder(arch, checkpoint)
    prov = {
        "source": "mstar import-encoder",
        "checkpoint": checkpoint.name,
        "checkpoint_sha256": sha256_file(checkpoint),
        "notes": f"architecture {arch}",
    }
    return build_bundle(
        out,
        encoder=encoder,
        patch_size=pre.size,
        embed_dim=PATCH_ENCODERS[arch].embed_dim,
        target_mpp=target_mpp,
        mean=pre.mean,
        std=pre.std,
        name=name or checkpoint.stem,
        demo=False,
        provenance=prov,
        progress=progress,
        encoder_parity_batches=(1, 2),  # ViT-L on a CPU: ~60 GFLOP a patch, twice (PyTorch + ORT)
    )


@click.command("export")
@click.argument("run_dir", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--out",
    "out",
    type=click.Path(path_type=Path),
    default=Path("model_repository"),
    show_default=True,
    help="Bundle directory (a Triton model repository with bundle.json).",
)
def export(run_dir: Path, out: Path) -> None:
    """Export a training run's models to ONNX, a Triton repository and a bundle manifest (parity-checked)."""
    rep = export_run(run_dir, out, progress=lambda m: click.echo(m, err=True))
    click.echo(json.dumps(rep.summary(), indent=2))
