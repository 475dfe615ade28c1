"""TransMIL aggregator: official layout loads strictly, forward matches the official algorithm, batch and export."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from nystrom_attention import NystromAttention
from torch import nn

from training.models.transmil import TransMIL, nystrom_forward


class _OfficialAttn(nn.Module):
    """Parameter layout of `nystrom_attention.NystromAttention(dim=512, dim_head=64, heads=8, residual=True)`."""

    def __init__(self) -> None:
        super().__init__()
        self.to_qkv = nn.Linear(512, 3 * 512, bias=False)
        self.to_out = nn.Sequential(nn.Linear(512, 512), nn.Dropout(0.1))
        self.res_conv = nn.Conv2d(8, 8, (33, 1), padding=(16, 0), groups=8, bias=False)


class _OfficialLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(512)
        self.attn = _OfficialAttn()


class _OfficialPPEG(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(512, 512, 7, 1, 3, groups=512)
        self.proj1 = nn.Conv2d(512, 512, 5, 1, 2, groups=512)
        self.proj2 = nn.Conv2d(512, 512, 3, 1, 1, groups=512)


class _OfficialTransMIL(nn.Module):
    """Test-local re-statement of the official TransMIL parameter names and shapes (method reference §1.2)."""

    def __init__(self, n_classes: int) -> None:
        super().__init__()
        self.pos_layer = _OfficialPPEG()
        self._fc1 = nn.Sequential(nn.Linear(1024, 512), nn.ReLU(), nn.Dropout(0.25))
        self.cls_token = nn.Parameter(torch.randn(1, 1, 512))
        self.layer1 = _OfficialLayer()
        self.layer2 = _OfficialLayer()
        self.norm = nn.LayerNorm(512)
        self._fc2 = nn.Linear(512, n_classes)


def test_official_state_dict_loads_strictly(tmp_path):
    ref = _OfficialTransMIL(n_classes=3)
    for p in ref.parameters():
        nn.init.normal_(p, std=0.02)
    path = tmp_path / "transmil.pth"
    torch.save(ref.state_dict(), path)
    state = torch.load(path, weights_only=True)

    ours = TransMIL(n_features=1024, n_classes=3)
    ours.load_state_dict(state, strict=True)
    for k, v in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    # Stage-1 vision_encoder: the same without the classifier, 2.67M parameters as in the paper
    stage1 = TransMIL(n_features=1024)
    stage1.load_state_dict({k: v for k, v in state.items() if not k.startswith("_fc2")}, strict=True)
    assert sum(p.numel() for p in stage1.parameters()) == 2_671_120


def _official_forward(model: TransMIL, x: torch.Tensor) -> torch.Tensor:
    """The official single-bag algorithm, calling the package's NystromAttention.forward as the official code does."""
    h = model._fc1(x)
    n = h.shape[1]
    side = math.ceil(math.sqrt(n))
    h = torch.cat([h, h[:, : side * side - n]], dim=1)
    h = torch.cat((model.cls_token.expand(1, -1, -1), h), dim=1)
    h = h + model.layer1.attn(model.layer1.norm(h))
    cls, feat = h[:, 0], h[:, 1:]
    grid = feat.transpose(1, 2).reshape(1, -1, side, side)
    pos = model.pos_layer
    grid = pos.proj(grid) + grid + pos.proj1(grid) + pos.proj2(grid)
    h = torch.cat((cls.unsqueeze(1), grid.flatten(2).transpose(1, 2)), dim=1)
    h = h + model.layer2.attn(model.layer2.norm(h))
    return model.norm(h)[:, 0]


def test_forward_matches_official_algorithm_per_bag():
    torch.manual_seed(0)
    model = TransMIL(n_features=48, dim=64, num_landmarks=16).eval()
    bags = torch.randn(3, 30, 48)  # 30 -> 36 square: 6 repeats, 31 tokens -> front pad to 32
    with torch.no_grad():
        out = model(bags)
        for i in range(3):
            expected = _official_forward(model, bags[i : i + 1])
            torch.testing.assert_close(out.embedding[i : i + 1], expected, rtol=1e-4, atol=1e-5)
            alone = model(bags[i : i + 1])
            torch.testing.assert_close(alone.embedding, out.embedding[i : i + 1], rtol=1e-4, atol=1e-5)
    assert out.tokens.shape == (3, 30, 64)
    assert out.attention.shape == (3, 30)
    assert out.logits is None


def test_nystrom_forward_matches_package_and_attention_row():
    torch.manual_seed(1)
    attn = NystromAttention(dim=64, dim_head=8, heads=8, num_landmarks=16, pinv_iterations=6, residual=True).eval()
    x = torch.randn(1, 37, 64)
    with torch.no_grad():
        expected, full = attn(x, return_attn=True)
        ours, row = nystrom_forward(attn, x, query_index=5)
    torch.testing.assert_close(ours, expected)
    pad = full.shape[-1] - 37
    torch.testing.assert_close(row, full[:, :, pad + 5, pad:], rtol=1e-4, atol=1e-6)


def test_attention_folds_square_padding_and_tokens_follow_input_order():
    torch.manual_seed(2)
    model = TransMIL(n_features=16, dim=32, num_landmarks=8).eval()
    x = torch.randn(1, 7, 16)  # 7 -> 9: patches 0 and 1 are repeated
    with torch.no_grad():
        out = model(x)
        assert torch.isfinite(out.tokens).all()
        assert (out.attention > 0).all()
        # the CLS row over all keys sums to ~1; patches receive part of it (CLS and zero-pad the rest)
        assert 0 < float(out.attention.sum()) <= 1.0 + 1e-4
    with_cls = TransMIL(n_features=16, dim=32, num_landmarks=8, n_classes=4).eval()
    assert with_cls(x).logits.shape == (1, 4)


def test_single_patch_bag():
    model = TransMIL(n_features=8, dim=32, num_landmarks=8).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 8))
    assert out.embedding.shape == (2, 32)
    assert out.tokens.shape == (2, 1, 32)


def test_dynamo_export_runs_at_other_patch_counts(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(3)
    model = TransMIL(n_features=24, dim=32, num_landmarks=8).eval()

    class Wrapper(nn.Module):
        def __init__(self, m: TransMIL) -> None:
            super().__init__()
            self.m = m

        def forward(self, x):
            o = self.m(x)
            return o.embedding, o.tokens, o.attention

    path = tmp_path / "transmil.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Wrapper(model),
            (torch.randn(1, 50, 24),),
            str(path),
            dynamo=True,
            dynamic_shapes={"x": {1: torch.export.Dim("n", min=2, max=1_000_000)}},
        )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    for n in (50, 83, 9):
        x = torch.randn(1, n, 24)
        emb, tokens, attn = sess.run(None, {name: x.numpy()})
        with torch.no_grad():
            ref = model(x)
        np.testing.assert_allclose(emb, ref.embedding.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(tokens, ref.tokens.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(attn, ref.attention.numpy(), rtol=1e-3, atol=1e-6)
