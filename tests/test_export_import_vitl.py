"""`mstar import-encoder` on a full-size mSTAR/UNI ViT-L/16 state dict (randomly initialised, written by the test).

Slow (ViT-L dynamo export on CPU: about a minute and ~1.2 GB on disk), so it is the only full-size test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from inference_fixtures import real_patches

from service.inference.bundle import load_bundle
from service.inference.ort_backend import OrtBackend


@pytest.mark.slow
def test_import_vit_large_checkpoint(tmp_path: Path) -> None:
    import timm

    from training.export.import_encoder import import_encoder
    from training.models.patch_encoder import Preprocessing

    torch.manual_seed(0)
    # the official mSTAR / UNI construction (Feature_extract/models/mSTAR.py), built independently of ours
    ref = timm.create_model(
        "vit_large_patch16_224",
        pretrained=False,
        img_size=224,
        patch_size=16,
        init_values=1e-5,
        num_classes=0,
        dynamic_img_size=True,
    ).eval()
    ckpt = tmp_path / "mSTAR.pth"
    torch.save(ref.state_dict(), ckpt)  # the released layout: a plain timm state dict
    rep = import_encoder(ckpt, tmp_path / "bundle", arch="mstar_vit_l16", target_mpp=0.5)
    b = load_bundle(tmp_path / "bundle")
    enc = b.patch_encoder
    assert b.manifest.embed_dim == 1024 and b.manifest.preprocessing.patch_size == 224
    assert b.manifest.preprocessing.field_um == 128.0  # official: 256 px at 0.5 µm/px, resized to 224
    assert enc.inputs[0].shape == ["batch", 224, 224, 3] and enc.outputs[0].shape == ["batch", 1024]
    assert b.manifest.provenance.checkpoint_sha256 is not None
    assert rep.parity[0].ok and rep.parity[0].min_cosine["embedding"] > 0.9999
    assert b.path(enc.name).stat().st_size > 1_000_000_000  # weights embedded in one file (< 2 GB)

    px = real_patches(2, 224)
    with torch.no_grad():
        want = ref(Preprocessing(224)(torch.from_numpy(px))).numpy()
    got = OrtBackend(b, device="cpu").embed_patches(px)
    cos = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
    assert np.abs(got - want).max() < 1e-3 and cos.min() > 0.9999
