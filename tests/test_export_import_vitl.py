"""`mstar import-encoder` on a full-size UNI checkpoint file: a randomly initialised ViT-L/16 built as UNI's model
card builds it and saved as UNI ships it (`pytorch_model.bin`, a plain timm state dict), loaded as is.

Slow (ViT-L dynamo export on CPU: about a minute and ~1.2 GB on disk), so it is the only full-size export test; the
released mSTAR layout (`mSTAR.pth`, the same timm keys) is exercised end to end by `tests/test_byow_workflow.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from inference_fixtures import real_patches

from service.inference.bundle import load_bundle
from service.inference.ort_backend import OrtBackend


@pytest.mark.slow
def test_import_uni_checkpoint_file(tmp_path: Path) -> None:
    import timm

    from service.cli import main
    from training.models.patch_encoder import Preprocessing

    torch.manual_seed(0)
    # UNI's model card: timm vit_large_patch16_224 with these kwargs, then load_state_dict(strict=True) of the
    # released pytorch_model.bin (CLS-token output, 1024-d, ImageNet mean/std); built here independently of ours
    ref = timm.create_model(
        "vit_large_patch16_224",
        pretrained=False,
        img_size=224,
        patch_size=16,
        init_values=1e-5,
        num_classes=0,
        dynamic_img_size=True,
    ).eval()
    ckpt = tmp_path / "uni" / "pytorch_model.bin"
    ckpt.parent.mkdir()
    torch.save(ref.state_dict(), ckpt)
    assert any(k.endswith("ls1.gamma") for k in ref.state_dict())  # LayerScale: why init_values is needed
    out = tmp_path / "bundle"
    res = CliRunner().invoke(
        main, ["import-encoder", str(ckpt), "--arch", "uni_vit_l16", "--out", str(out)], catch_exceptions=False
    )
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    parity = summary["parity"][0]
    assert parity["ok"] and parity["min_cosine"]["embedding"] > 0.9999

    b = load_bundle(out)
    enc = b.patch_encoder
    assert b.manifest.embed_dim == 1024 and b.manifest.preprocessing.patch_size == 224
    assert b.manifest.preprocessing.field_um == 128.0  # official: 256 px at 0.5 µm/px, resized to 224, by default
    assert b.manifest.preprocessing.mean == (0.485, 0.456, 0.406)
    assert enc.inputs[0].shape == ["batch", 224, 224, 3] and enc.outputs[0].shape == ["batch", 1024]
    prov = b.manifest.provenance
    assert prov.source == "mstar import-encoder" and prov.checkpoint == "pytorch_model.bin"
    assert prov.checkpoint_sha256 is not None and "uni_vit_l16" in prov.notes
    assert b.path(enc.name).stat().st_size > 1_000_000_000  # weights embedded in one file (< 2 GB)

    px = real_patches(2, 224)
    with torch.no_grad():
        want = ref(Preprocessing(224)(torch.from_numpy(px))).numpy()
    got = OrtBackend(b, device="cpu").embed_patches(px)
    cos = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
    assert np.abs(got - want).max() < 1e-3 and cos.min() > 0.9999
