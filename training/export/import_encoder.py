"""`mstar import-encoder`: a servable bundle around a released ViT checkpoint (mSTAR/UNI, a local file), with
heads trained on its features (`mstar train downstream`) when given: bring your own weights, then serve them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from service.errors import BundleError
from service.inference.bundle import sha256_file
from training.export.bundle import ExportReport, HeadSpec, build_bundle
from training.models.patch_encoder import PATCH_ENCODERS, build_patch_encoder


def _heads(heads: Sequence[tuple[str, str | Path]], embed_dim: int) -> list[HeadSpec]:
    """Heads saved by `mstar train downstream` (`head.pt`) or official TransMIL classifiers, checked to read this
    encoder's features."""
    from training.export.contract import encoder_head_row

    out = []
    for name, path in heads:
        row = encoder_head_row(name, path, embed_dim)
        out.append(
            HeadSpec(name, row["module"], row["task"], row["n_outputs"], row.get("labels"), row.get("bin_edges"))
        )
    return out


def import_encoder(
    checkpoint: str | Path,
    out: str | Path,
    *,
    arch: str = "mstar_vit_l16",
    target_mpp: float = 0.5,
    field_um: float | None = None,
    heads: Sequence[tuple[str, str | Path]] = (),
    name: str | None = None,
    progress=None,
) -> ExportReport:
    """A bundle around a released ViT checkpoint (mSTAR/UNI: a plain timm state dict; a
    `{'model_state_dict': ...}` wrapper and DDP `module.` prefixes are accepted). Loaded strictly.

    `field_um` defaults to the architecture's own field of view (mSTAR/UNI: 128 µm, the official 256 px at
    0.5 µm/px resized to 224), so the service tiles as the released features were made. `heads`:
    `(name, path)` of heads trained on features of this encoder, served next to it."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise BundleError(f"checkpoint not found: {checkpoint}")
    if arch not in PATCH_ENCODERS:
        raise BundleError(f"unknown architecture {arch!r}; choose one of {sorted(PATCH_ENCODERS)}")
    spec = PATCH_ENCODERS[arch]
    head_specs = _heads(heads, spec.embed_dim)
    encoder, pre = build_patch_encoder(arch, checkpoint)
    prov = {
        "source": "mstar import-encoder",
        "checkpoint": checkpoint.name,
        "checkpoint_sha256": sha256_file(checkpoint),
        "notes": f"architecture {arch}" + (f"; heads {[h.name for h in head_specs]}" if head_specs else ""),
    }
    return build_bundle(
        out,
        encoder=encoder,
        patch_size=pre.size,
        embed_dim=spec.embed_dim,
        target_mpp=target_mpp,
        field_um=field_um if field_um is not None else spec.field_um,
        mean=pre.mean,
        std=pre.std,
        heads=head_specs,
        name=name or checkpoint.stem,
        demo=False,
        provenance=prov,
        progress=progress,
        encoder_parity_batches=(1, 2),  # ViT-L on a CPU: ~60 GFLOP a patch, twice (PyTorch + ORT)
    )
