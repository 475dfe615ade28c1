"""Text and gene encoders: offline loading, CLS semantics, binning, Gene2Vec table, and the Stage-1 wrapper names."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from service.errors import InvalidParameterError
from training.models.gene_encoder import GeneEncoder, bin_expression, quantile_edges, read_gene2vec
from training.models.mstar import MStar
from training.models.text_encoder import TextEncoder, build_tiny_bert, default_text_model_dir
from training.models.transmil import TransMIL

REPORTS = [
    "invasive ductal carcinoma of the breast, poorly differentiated; margins are clear.",
    "adenocarcinoma of the colon with gland formation, moderately differentiated.",
    "squamous cell carcinoma of the lung with keratinisation; lymphovascular invasion present.",
]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return build_tiny_bert(tmp_path_factory.mktemp("bert"), REPORTS * 5, vocab_size=120)


def test_tiny_bert_cls_is_last_hidden_state_first_token(tiny_bert):
    enc = TextEncoder(tiny_bert, max_length=32).eval()
    tok = enc.tokenize(REPORTS)
    assert (tok["input_ids"][:, 0] == enc.tokenizer.cls_token_id).all()
    with torch.no_grad():
        cls = enc(**tok)
        full = enc.bert(**tok).last_hidden_state
    torch.testing.assert_close(cls, full[:, 0])
    assert cls.shape == (3, enc.hidden_size)
    # padding another text in the batch must not change a report's CLS (attention mask honoured)
    with torch.no_grad():
        alone = enc(**enc.tokenize(REPORTS[1:2]))
    torch.testing.assert_close(alone, cls[1:2], rtol=1e-4, atol=1e-5)


def test_tiny_bert_vocabulary_is_reproducible_and_covers_unseen_words(tiny_bert, tmp_path):
    # another interpreter with another hash seed must write the same tokenizer (the demo bundle depends on it)
    code = (
        "import sys; from training.models.text_encoder import build_tiny_bert; "
        f"build_tiny_bert(sys.argv[1], {REPORTS!r} * 5, vocab_size=120)"
    )
    other = tmp_path / "again"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code, str(other)], check=True, env=env, cwd=Path(__file__).parents[1])
    assert (other / "tokenizer.json").read_bytes() == (tiny_bert / "tokenizer.json").read_bytes()
    enc = TextEncoder(tiny_bert, max_length=32)
    ids = enc.tokenize(["medullary carcinoma, margins clear"])["input_ids"][0].tolist()
    assert enc.tokenizer.unk_token_id not in ids  # unseen words fall back to characters, never [UNK]
    vocab = enc.tokenizer.get_vocab()
    assert "carcinoma" in vocab and len(vocab) <= 120


def test_packaged_minilm_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = TextEncoder(max_length=64).eval()
    assert enc.model_dir == str(default_text_model_dir())
    with torch.no_grad():
        out = enc(**enc.tokenize(REPORTS[:2]))
    assert out.shape == (2, 384)
    assert not any(k.startswith("bert.pooler") for k in enc.state_dict())


def test_text_model_dir_without_config_is_refused(tmp_path):
    with pytest.raises(InvalidParameterError, match=r"config\.json"):
        TextEncoder(tmp_path)


def test_binning_scbert_and_quantile():
    v = np.array([[0.2, 1.7, 9.0], [3.5, 0.0, 5.0]], dtype=np.float32)
    assert bin_expression(v, 5).tolist() == [[0, 1, 5], [3, 0, 5]]
    train = np.random.default_rng(0).normal(size=(200, 3)).astype(np.float32)
    edges = quantile_edges(train, 4)
    assert edges.shape == (3, 4)
    bins = bin_expression(train, 4, edges)
    assert bins.min() == 0 and bins.max() == 4
    # quantile bins are roughly equally filled on the training data
    counts = np.bincount(bins[:, 0], minlength=5)
    assert counts.min() >= 30


def test_gene2vec_table_and_encoder(tmp_path):
    path = tmp_path / "gene2vec.txt"
    path.write_text("TP53 1 2 3 4\nEGFR 0.5 0.5 0.5 0.5\nOTHER 9 9 9 9\n")
    table, found = read_gene2vec(path, ["EGFR", "KRAS", "TP53"], 4)
    assert found == 2
    assert table[2].tolist() == [1, 2, 3, 4] and table[0].tolist() == [0.5] * 4
    with pytest.raises(InvalidParameterError, match="values"):
        read_gene2vec(path, ["TP53"], 3)

    torch.manual_seed(0)
    enc = GeneEncoder(3, n_bins=5, dim=4, depth=1, heads=2, dim_head=4, gene_table=table)
    assert not enc.gene_emb.weight.requires_grad  # Gene2Vec frozen by default
    bins = torch.tensor([[0, 3, 5], [1, 1, 1]])
    out = enc(bins)
    assert out.shape == (2, 4)
    # the profile matters: different bins give different CLS outputs; deterministic across calls
    assert not torch.allclose(out[0], out[1])
    torch.testing.assert_close(enc(bins), out)
    with pytest.raises(InvalidParameterError, match="genes"):
        enc(torch.zeros(1, 4, dtype=torch.long))


def test_mstar_wrapper_names_and_shared_space(tiny_bert):
    text = TextEncoder(tiny_bert, max_length=32)
    model = MStar(TransMIL(n_features=16, dim=32, num_landmarks=8), text, GeneEncoder(5, dim=8, heads=2, dim_head=4))
    names = set(model.state_dict())
    for prefix in (
        "vision_encoder._fc1.0.weight",
        "vision_encoder.layer2.attn.to_qkv.weight",
        "proj_text.weight",
        "proj_gene.weight",
        "logit_scale",
    ):
        assert prefix in names
    assert any(k.startswith("text_encoder.bert.") for k in names)
    assert any(k.startswith("gene_encoder.") for k in names)
    assert float(model.logit_scale.detach().exp()) == pytest.approx(1 / 0.07, rel=1e-5)
    tok = text.tokenize(REPORTS[:2])
    emb = model(torch.randn(2, 10, 16), tok["input_ids"], tok["attention_mask"], torch.zeros(2, 5, dtype=torch.long))
    assert emb.slide.shape == emb.report.shape == emb.rna.shape == (2, 32)
