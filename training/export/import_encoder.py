"""`mstar import-encoder`: a servable encoder-only bundle around a released ViT checkpoint (mSTAR/UNI, a local file)."""

from __future__ import annotations

from pathlib import Path

from service.errors import BundleError
from service.inference.bundle import sha256_file
from training.export.bundle import ExportReport, build_bundle
from training.models.patch_encoder import PATCH_ENCODERS, build_patch_encoder


def import_encoder(
    checkpoint: str | Path,
    out: str | Path,
    *,
    arch: str = "mstar_vit_l16",
    target_mpp: float = 0.5,
    name: str | None = None,
    progress=None,
) -> ExportReport:
    """A bundle around a released ViT checkpoint (mSTAR/UNI: a plain timm state dict; a
    `{'model_state_dict': ...}` wrapper and DDP `module.` prefixes are accepted). Loaded strictly."""
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
