"""Patch encoders: timm ViTs built from named configurations, never downloaded.

`mstar_vit_l16` is the mSTAR/UNI ViT-L/16 exactly as the official loader builds it, so a released `mSTAR.pth`
(a plain timm state dict) loads with `strict=True` from a local file. The small configurations are for CPU tests
and demos. Preprocessing lives in `Preprocessing`, which every artifact records (export, feature files).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from service.errors import BundleError, InvalidParameterError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How uint8 RGB patches become model input: resize to `size` x `size`, scale to [0,1], normalise.

    ImageNet statistics always (the hub config's 0.5/0.5 is wrong for mSTAR, see the method reference §4).
    """

    size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        return cls(
            size=int(data["size"]),
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
            interpolation=str(data.get("interpolation", "bilinear")),
        )

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 `[B, H, W, 3]` (or `[H, W, 3]`) -> float `[B, 3, size, size]` normalised."""
        if images.dim() == 3:
            images = images.unsqueeze(0)
        if images.dim() != 4 or images.shape[-1] != 3:
            raise InvalidParameterError(f"expected uint8 patches [B, H, W, 3], got shape {tuple(images.shape)}")
        x = images.permute(0, 3, 1, 2).float() / 255.0
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(
                x, size=(self.size, self.size), mode=self.interpolation, antialias=True, align_corners=False
            )
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


@dataclass(frozen=True)
class PatchEncoderSpec:
    """A named timm configuration: `timm.create_model(arch, **kwargs)` plus its preprocessing and output dim."""

    arch: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    embed_dim: int = 1024
    # µm of tissue per patch side it was trained on (None: input size x target µm/px, no resize)
    field_um: float | None = None


# official mSTAR/UNI tiling: 256 px at 20x (0.5 µm/px) = 128 µm, resized to 224 (method reference §5)
OFFICIAL_FIELD_UM = 128.0


PATCH_ENCODERS: dict[str, PatchEncoderSpec] = {
    # the released mSTAR / UNI configuration (official Feature_extract loader)
    "mstar_vit_l16": PatchEncoderSpec(
        "vit_large_patch16_224",
        dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True),
        Preprocessing(224),
        1024,
        OFFICIAL_FIELD_UM,
    ),
    "vit_small_224": PatchEncoderSpec(
        "vit_small_patch16_224",
        dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True),
        Preprocessing(224),
        384,
    ),
    "vit_tiny_224": PatchEncoderSpec(
        "vit_tiny_patch16_224",
        dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True),
        Preprocessing(224),
        192,
    ),
    # CPU-test size: 112 px input, 2 blocks of width 96
    "vit_micro_112": PatchEncoderSpec(
        "vit_tiny_patch16_224",
        dict(
            img_size=112,
            patch_size=16,
            embed_dim=96,
            depth=2,
            num_heads=3,
            init_values=1e-5,
            num_classes=0,
            dynamic_img_size=True,
        ),
        Preprocessing(112),
        96,
    ),
    # the UNI release: the same timm configuration and field of view as mSTAR (its Stage-2 initialisation)
    "uni_vit_l16": PatchEncoderSpec(
        "vit_large_patch16_224",
        dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True),
        Preprocessing(224),
        1024,
        OFFICIAL_FIELD_UM,
    ),
    # weight-free colour/texture statistics (training.models.tissue_stats): fast CPU demos only
    "tissue_stats_112": PatchEncoderSpec("tissue_stats", {}, Preprocessing(112), 41),
}


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BundleError(f"patch encoder checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unreadable pickle / safetensors header
        raise BundleError(f"cannot read patch encoder checkpoint {path}: {err}") from err
    for key in ("model_state_dict", "state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise BundleError(f"{path} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def grid_mpp(target_mpp: float, patch_size: int, field_um: float | None) -> float:
    """µm/px to tile at so a `patch_size` patch covers `field_um` µm (cut at `target_mpp`, then resized)."""
    return target_mpp if field_um is None else field_um / patch_size


def build_patch_encoder(name: str, checkpoint: str | Path | None = None) -> tuple[nn.Module, Preprocessing]:
    """Build the named encoder (random init, `pretrained=False`) and load `checkpoint` strictly if given."""
    if name not in PATCH_ENCODERS:
        raise InvalidParameterError(f"unknown patch encoder {name!r}; choose one of {sorted(PATCH_ENCODERS)}")
    spec = PATCH_ENCODERS[name]
    if spec.arch == "tissue_stats":
        if checkpoint is not None:
            raise BundleError(f"{name} has no weights; it takes no checkpoint")
        from .tissue_stats import TissueStats

        return TissueStats(spec.preprocessing.mean, spec.preprocessing.std).eval(), spec.preprocessing
    model = timm.create_model(spec.arch, pretrained=False, **spec.kwargs)
    if checkpoint is not None:
        state = _read_state_dict(Path(checkpoint))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise BundleError(f"checkpoint {checkpoint} does not match {name}: {err}") from err
    return model.eval(), spec.preprocessing
