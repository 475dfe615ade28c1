"""Patch encoder: the released mSTAR ViT-L key layout loads strictly from a local file; small configs; preprocessing."""

from __future__ import annotations

import pytest
import torch

from service.errors import BundleError, InvalidParameterError
from training.models.patch_encoder import IMAGENET_MEAN, PATCH_ENCODERS, Preprocessing, build_patch_encoder


def _mstar_layout_state_dict() -> dict[str, torch.Tensor]:
    """Tensors under the key names and shapes of the released `mSTAR.pth` (method reference §4).

    Mostly constant fills (random fills of 303M values would dominate the test time); the last block's
    weights are random so the test can see they arrived.
    """
    g = torch.Generator().manual_seed(0)
    d, hidden = 1024, 4096
    sd = {
        "cls_token": torch.randn(1, 1, d, generator=g),
        "pos_embed": torch.randn(1, 197, d, generator=g),
        "patch_embed.proj.weight": torch.full((d, 3, 16, 16), 0.01),
        "patch_embed.proj.bias": torch.zeros(d),
        "norm.weight": torch.ones(d),
        "norm.bias": torch.zeros(d),
    }
    for i in range(24):
        b = f"blocks.{i}."
        sd |= {
            b + "norm1.weight": torch.ones(d),
            b + "norm1.bias": torch.zeros(d),
            b + "attn.qkv.weight": torch.full((3 * d, d), 0.01),
            b + "attn.qkv.bias": torch.zeros(3 * d),
            b + "attn.proj.weight": torch.full((d, d), 0.01),
            b + "attn.proj.bias": torch.zeros(d),
            b + "ls1.gamma": torch.full((d,), 1e-5),
            b + "norm2.weight": torch.ones(d),
            b + "norm2.bias": torch.zeros(d),
            b + "mlp.fc1.weight": torch.full((hidden, d), 0.01),
            b + "mlp.fc1.bias": torch.zeros(hidden),
            b + "mlp.fc2.weight": torch.full((d, hidden), 0.01),
            b + "mlp.fc2.bias": torch.zeros(d),
            b + "ls2.gamma": torch.full((d,), 1e-5),
        }
    sd["blocks.23.mlp.fc2.weight"] = torch.randn(d, hidden, generator=g) * 0.02
    return sd


def test_vit_l_loads_released_layout_strictly(tmp_path):
    sd = _mstar_layout_state_dict()
    path = tmp_path / "mSTAR.pth"
    torch.save(sd, path)
    model, prep = build_patch_encoder("mstar_vit_l16", path)
    loaded = model.state_dict()
    assert set(loaded) == set(sd)
    assert torch.equal(loaded["blocks.23.mlp.fc2.weight"], sd["blocks.23.mlp.fc2.weight"])
    assert prep.size == 224 and prep.mean == IMAGENET_MEAN
    assert PATCH_ENCODERS["mstar_vit_l16"].embed_dim == 1024


def test_incomplete_checkpoint_is_refused(tmp_path):
    model, _ = build_patch_encoder("vit_micro_112")
    sd = model.state_dict()
    del sd["blocks.1.ls1.gamma"]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(BundleError, match="does not match"):
        build_patch_encoder("vit_micro_112", tmp_path / "broken.pth")


def test_missing_or_unknown_encoder_is_refused(tmp_path):
    with pytest.raises(BundleError, match="not found"):
        build_patch_encoder("vit_micro_112", tmp_path / "nope.pth")
    with pytest.raises(InvalidParameterError, match="unknown patch encoder"):
        build_patch_encoder("resnet_fake")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(BundleError, match="cannot read"):
        build_patch_encoder("vit_micro_112", tmp_path / "junk.pth")


def test_micro_encoder_roundtrip_and_preprocessing(tmp_path):
    torch.manual_seed(0)
    model, prep = build_patch_encoder("vit_micro_112")
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "w.pt")
    again, _ = build_patch_encoder("vit_micro_112", tmp_path / "w.pt")
    patches = torch.randint(0, 256, (3, 224, 224, 3), dtype=torch.uint8)
    x = prep(patches)
    assert x.shape == (3, 3, 112, 112)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(again(x), out)
    assert out.shape == (3, PATCH_ENCODERS["vit_micro_112"].embed_dim)
    # a mid-grey patch normalises to (0.5 - mean) / std per channel
    grey = prep(torch.full((112, 112, 3), 128, dtype=torch.uint8))
    expected = (128 / 255 - torch.tensor(prep.mean)) / torch.tensor(prep.std)
    torch.testing.assert_close(grey[0, :, 5, 5], expected.float())
    assert Preprocessing.from_dict(prep.to_dict()) == prep
    with pytest.raises(InvalidParameterError):
        prep(torch.zeros(2, 3, 112, 112, dtype=torch.uint8))


def test_tissue_stats_encoder_describes_composition():
    model, prep = build_patch_encoder("tissue_stats_112")
    assert PATCH_ENCODERS["tissue_stats_112"].embed_dim == 41
    white = torch.full((1, 112, 112, 3), 245, dtype=torch.uint8)
    nuclei = white.clone()
    nuclei[:, ::8, ::8] = 40  # scattered dark dots
    nuclei[:, 1::8, ::8] = 40
    with torch.no_grad():
        a, b = model(prep(white)), model(prep(nuclei))
    assert a.shape == (1, 41) and torch.isfinite(a).all()
    assert not torch.allclose(a, b)
    with pytest.raises(BundleError, match="no weights"):
        build_patch_encoder("tissue_stats_112", "x.pt")
