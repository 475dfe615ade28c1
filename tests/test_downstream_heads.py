"""ABMIL, MIL heads (classification / survival / Stage-1 initialised TransMIL) and the report decoder."""

from __future__ import annotations

import pytest
import torch
from report_toy import train_toy_reports

from service.errors import InvalidParameterError
from training.checkpoints import head_from_stage1, stage1_record
from training.models.abmil import ABMIL
from training.models.heads import MILHead
from training.models.mstar import MStar
from training.models.report_decoder import ReportGenerator, Vocabulary, normalize, tokenize
from training.models.transmil import TransMIL

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_abmil_shapes_and_attention() -> None:
    torch.manual_seed(0)
    m = ABMIL(n_features=16, n_classes=3, dim=32).eval()
    out = m(torch.randn(2, 7, 16))
    assert out.logits.shape == (2, 3) and out.attention.shape == (2, 7) and out.embedding.shape == (2, 32)
    assert torch.allclose(out.attention.sum(-1), torch.ones(2), atol=1e-6)
    # the bag embedding is exactly the attention-weighted sum of the projected patches
    h = m.fc(torch.randn(1, 5, 16))
    assert h.shape == (1, 5, 32)
    single = m(torch.randn(5, 16))
    assert single.logits.shape == (1, 3)


def test_abmil_permutation_invariant() -> None:
    torch.manual_seed(0)
    m = ABMIL(8, 2, dim=16).eval()
    x = torch.randn(1, 9, 8)
    perm = torch.randperm(9)
    a, b = m(x), m(x[:, perm])
    assert torch.allclose(a.logits, b.logits, atol=1e-5)
    assert torch.allclose(a.attention[:, perm], b.attention, atol=1e-6)


def test_survival_head_outputs() -> None:
    torch.manual_seed(0)
    head = MILHead("abmil", 8, 4, task="survival", dim=16).eval()
    out = head(torch.randn(1, 10, 8))
    assert out.hazards.shape == (1, 4) and out.survival.shape == (1, 4)
    assert torch.all(out.survival[:, 1:] <= out.survival[:, :-1])  # non-increasing
    assert torch.allclose(out.risk, -out.survival.sum(-1))


def _stage1_ckpt(tmp_path, n_features=12, dim=32):
    torch.manual_seed(1)
    vision = TransMIL(n_features=n_features, dim=dim, heads=2, num_landmarks=8)
    # as DDP saves it: `module.` before every key
    state = {f"module.vision_encoder.{k}": v for k, v in vision.state_dict().items()}
    state["module.proj_text.weight"] = torch.zeros(dim, 4)
    path = tmp_path / "stage1.pt"
    torch.save({**stage1_record(MStar(vision, None, None)), "model_state_dict": state}, path)
    return path, vision


def test_transmil_pre_loads_stage1_and_uses_lower_lr(tmp_path) -> None:
    path, vision = _stage1_ckpt(tmp_path)
    head = head_from_stage1(path, n_outputs=3)
    assert head.kind == "transmil_pre"
    for k, v in vision.state_dict().items():
        assert torch.equal(head.mil.state_dict()[k], v)
    groups = head.param_groups(lr=2e-4, lr_pretrained=2e-5)
    assert [g["lr"] for g in groups] == [2e-4, 2e-5]
    assert sum(p.numel() for p in groups[0]["params"]) == 32 * 3 + 3  # only the new _fc2
    head.eval()
    out = head(torch.randn(1, 20, 12))
    assert out.logits.shape == (1, 3) and out.attention.shape == (1, 20)
    # same slide embedding as the Stage-1 aggregator it came from
    vision.eval()
    x = torch.randn(1, 15, 12)
    assert torch.allclose(head(x).embedding, vision(x).embedding, atol=1e-5)


def test_bad_stage1_checkpoint(tmp_path) -> None:
    with pytest.raises(InvalidParameterError):
        head_from_stage1(tmp_path / "missing.pt", 2)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(InvalidParameterError):
        head_from_stage1(bad, 2)
    empty = tmp_path / "empty.pt"
    torch.save({"model_state_dict": {"text_encoder.x": torch.zeros(1)}}, empty)
    with pytest.raises(InvalidParameterError, match="vision_encoder"):
        head_from_stage1(empty, 2)
    with pytest.raises(InvalidParameterError):
        MILHead("gatedmil", 4, 2)  # type: ignore[arg-type]


def test_vocabulary_roundtrip() -> None:
    texts = ["Lung Adenocarcinoma, grade 2.", "lung squamous carcinoma , grade 3 .", "rare-word once"]
    assert tokenize(texts[0]) == ["lung", "adenocarcinoma", ",", "grade", "2", "."]
    vocab = Vocabulary.build(texts, min_freq=2)
    assert "lung" in vocab.stoi and "rare-word" not in vocab.stoi
    ids = vocab.encode(texts[0])
    assert ids[0] == Vocabulary.BOS and ids[-1] == Vocabulary.EOS
    assert Vocabulary.UNK in ids  # adenocarcinoma appears once
    assert vocab.decode(vocab.encode("lung , grade .")) == normalize("Lung, grade.")
    again = Vocabulary.from_dict(vocab.to_dict())
    assert again.itos == vocab.itos
    assert len(vocab.encode("lung " * 500, max_len=10)) == 12


def test_report_generator_learns_and_decodes() -> None:
    """Two classes of bags, two fixed reports: a few hundred steps must map each bag to its report."""
    toy = train_toy_reports(
        lambda vocab: ReportGenerator(6, vocab, d_model=32, n_memory=4, decoder_layers=2, heads=2, d_ff=64, dropout=0.0)
    )
    model, vocab, protos = toy.model, toy.vocab, toy.protos
    for c in (0, 1):
        x = toy.bag(c)
        assert vocab.decode(model.greedy(x)) == toy.expected(c)
        assert vocab.decode(model.beam_search(x, beam=3)) == toy.expected(c)
    # batched greedy with padding agrees with the one-bag loop
    xs = [torch.randn(10, 6) + protos[0], torch.randn(7, 6) + protos[1]]
    x = torch.zeros(2, 10, 6)
    mask = torch.ones(2, 10, dtype=torch.bool)
    for i, f in enumerate(xs):
        x[i, : len(f)], mask[i, : len(f)] = f, False
    batch = model.greedy_batch(x, mask)
    assert batch == [model.greedy(f) for f in xs]
    # the exported pieces: encode once, then step
    mem = model.encode(xs[0])
    step_logits = model.step(torch.tensor([[Vocabulary.BOS]]), mem)
    assert step_logits.shape == (1, len(vocab))


def test_beam_search_blocks_repeated_trigrams() -> None:
    torch.manual_seed(0)
    texts = ["a b c a b c a b c ."]
    vocab = Vocabulary.build(texts, min_freq=1)
    model = ReportGenerator(4, len(vocab), d_model=32, n_memory=2, decoder_layers=1, heads=2, d_ff=64, dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    tok = torch.tensor([vocab.encode(texts[0])])
    for _ in range(120):
        loss = torch.nn.functional.cross_entropy(model(torch.randn(1, 5, 4), tok[:, :-1])[0], tok[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x = torch.randn(5, 4)
    assert vocab.decode(model.greedy(x)) == "a b c a b c a b c ."  # it learned the repetition
    out = vocab.decode(model.beam_search(x, beam=3, block_trigrams=True)).split()
    trigrams = [tuple(out[i : i + 3]) for i in range(len(out) - 2)]
    assert len(trigrams) == len(set(trigrams))
