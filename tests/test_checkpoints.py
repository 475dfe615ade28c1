"""Checkpoint formats (`training.checkpoints`, `training.export.contract`): models record their config, loads
rebuild from it, and files written before the formats were named still load and compute the same outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from service.errors import InvalidParameterError
from training.checkpoints import (
    HEAD_FORMAT,
    head_from_stage1,
    load_head,
    load_report_generator,
    load_stage1,
    load_stage1_vision,
    read_stage1,
    save_head,
    save_stage1,
)
from training.data.patches import load_teacher
from training.export.contract import head_row, load_export_checkpoint, save_export_checkpoint
from training.models.heads import MILHead
from training.models.mstar import MStar
from training.models.report_decoder import ReportGenerator
from training.models.transmil import TransMIL

LEGACY = Path(__file__).parent / "data" / "legacy_checkpoints"


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    return dict(np.load(LEGACY / "expected.npz"))


def test_legacy_stage1_loads_from_its_training_config(expected) -> None:
    ckpt = read_stage1(LEGACY / "stage1.pt")
    assert "aggregator_config" not in torch.load(LEGACY / "stage1.pt", weights_only=False)
    # sizes from the run's own config (dim 16, 2 heads, 4 landmarks) and `n_features`, not from weight shapes
    assert {k: ckpt.aggregator_config[k] for k in ("n_features", "dim", "heads", "num_landmarks")} == {
        "n_features": 8,
        "dim": 16,
        "heads": 2,
        "num_landmarks": 4,
    }
    x = torch.from_numpy(expected["x"])
    with torch.no_grad():
        emb = load_stage1_vision(LEGACY / "stage1.pt")(x.unsqueeze(0)).embedding.numpy()
        np.testing.assert_allclose(emb, expected["stage1_embedding"], atol=1e-5)
        _, info = load_teacher(LEGACY / "stage1.pt")
        assert info["num_landmarks"] == 4 and info["n_features"] == 8
        assert load_stage1(LEGACY / "stage1.pt").text is None


def test_legacy_heads_load_and_compute_the_same(expected) -> None:
    x = torch.from_numpy(expected["x"])
    abmil, meta = load_head(LEGACY / "head_abmil.pt")
    assert meta["task"] == "classification" and abmil.kind == "abmil"
    tpre, _ = load_head(LEGACY / "head_tpre.pt")
    assert tpre.kind == "transmil_pre" and tpre.feature_mean is not None
    report, config, itos = load_report_generator(LEGACY / "head_report.pt")
    with torch.no_grad():
        np.testing.assert_allclose(abmil(x).logits.numpy(), expected["abmil_logits"], atol=1e-5)
        np.testing.assert_allclose(tpre(x).risk.numpy(), expected["tpre_risk"], atol=1e-5)
        ids = report.greedy_batch(x.unsqueeze(0), torch.zeros(1, 10, dtype=torch.bool))[0]
    assert list(ids) == expected["report_ids"].tolist()
    assert config["d_model"] == 16 and len(itos) == config["vocab_size"]


def test_legacy_export_checkpoint_loads(expected) -> None:
    c = load_export_checkpoint(LEGACY / "export.pt")
    assert [h.name for h in c.heads] == ["cls", "surv"] and c.embed_dim == 41
    x = torch.from_numpy(expected["x41"])
    with torch.no_grad():
        emb = c.aggregator.eval()(x.unsqueeze(0)).embedding.numpy()
        risk = c.heads[1].module(x).risk.numpy()
    np.testing.assert_allclose(emb, expected["export_agg_embedding"], atol=1e-5)
    np.testing.assert_allclose(risk, expected["export_surv_risk"], atol=1e-5)


def test_models_record_their_config_and_heads_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    # a head dim (12) that is not dim // heads: only a recorded config can rebuild it
    head = MILHead("transmil", 6, 3, dim=24, transmil_kwargs={"heads": 3, "dim_head": 12, "num_landmarks": 6})
    assert head.mil.config["dim_head"] == 12 and head.config["n_features"] == 6
    path = save_head(tmp_path / "head.pt", head, {"labels": ["a", "b", "c"], "task": "classification"})
    raw = torch.load(path, weights_only=False)
    assert raw["format"] == HEAD_FORMAT and raw["model"] == "mil" and raw["config"] == head.config
    loaded, meta = load_head(path)
    x = torch.randn(9, 6)
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, head.eval()(x).logits)
    row = head_row("h", loaded, meta)
    assert row["transmil_kwargs"]["dim_head"] == 12 and row["labels"] == ["a", "b", "c"]

    gen = ReportGenerator(5, 30, d_model=16, n_memory=4, heads=2, d_ff=16, decoder_layers=1, max_len=9)
    rpath = save_head(tmp_path / "report.pt", gen, {"vocabulary": {"itos": [str(i) for i in range(30)]}})
    assert load_report_generator(rpath)[1] == gen.config
    with pytest.raises(InvalidParameterError, match="report head, not a mil head"):
        load_head(rpath)
    torch.save({**raw, "format": "mstar-head/99"}, tmp_path / "future.pt")
    with pytest.raises(InvalidParameterError, match="unknown head format"):
        load_head(tmp_path / "future.pt")


def test_stage1_checkpoint_records_its_aggregator(tmp_path) -> None:
    torch.manual_seed(0)
    vision = TransMIL(n_features=5, dim=20, heads=4, dim_head=8, num_landmarks=6)
    path = save_stage1(tmp_path / "s1.pt", MStar(vision, None, None), config={"model": {}})
    assert read_stage1(path).aggregator_config == vision.config
    head = head_from_stage1(path, 2)
    x = torch.randn(1, 11, 5)
    with torch.no_grad():
        assert torch.allclose(head.eval()(x).embedding, vision.eval()(x).embedding, atol=1e-6)
    # weights that disagree with the recorded config are refused with the reason, not silently resized
    raw = torch.load(path, weights_only=False)
    raw["aggregator_config"]["dim_head"] = 5
    torch.save(raw, tmp_path / "bad.pt")
    with pytest.raises(InvalidParameterError, match="does not match its recorded config"):
        load_stage1_vision(tmp_path / "bad.pt")


def test_export_checkpoint_round_trip_uses_recorded_sizes(tmp_path) -> None:
    torch.manual_seed(0)
    agg = TransMIL(n_features=41, dim=16, heads=2, dim_head=4, num_landmarks=4)
    head = MILHead("abmil", 41, 2, dim=8).eval()
    save_export_checkpoint(
        tmp_path / "export.pt",
        encoder_name="tissue_stats_112",
        aggregator=agg,
        heads=[head_row("h", head, {"labels": ["x", "y"]})],
    )
    c = load_export_checkpoint(tmp_path)
    assert c.aggregator.config["dim_head"] == 4 and c.heads[0].labels == ["x", "y"]
    with pytest.raises(InvalidParameterError, match=r"has no export\.pt"):
        load_export_checkpoint(tmp_path / "nowhere")
