"""HistGen report generator (training/models/histgen.py): hierarchy, cross-modal memory, padding, decoding,
checkpoints and ONNX export with a dynamic number of regions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from report_toy import train_toy_reports

from service.errors import InvalidParameterError
from training.checkpoints import load_report_generator, save_head
from training.models.histgen import HistGenGenerator, MemoryQuery
from training.models.report_arch import build_report_model, report_kwargs
from training.models.report_decoder import ReportGenerator, Vocabulary

TINY = {"d_model": 32, "heads": 2, "d_ff": 64, "decoder_layers": 1, "region_size": 5, "n_prototypes": 8}
TINY |= {"cmm_size": 32, "topk": 8, "dropout": 0.0, "max_len": 16}


def _model(n_features: int = 6, vocab: int = 30, **kw) -> HistGenGenerator:
    torch.manual_seed(0)
    return HistGenGenerator(n_features, vocab, **(TINY | kw)).eval()


def test_memory_has_one_row_per_region() -> None:
    m = _model()
    for n in (1, 4, 5, 9, 23):
        with torch.no_grad():
            assert m.encode(torch.randn(n, 6)).shape == (1, math.ceil(n / 4), 32)


def test_global_encoder_carries_context_between_regions() -> None:
    """With the global (WSI) layer a region's memory row depends on the patches of other regions; with only the
    local layer (`hat_layers: 1`) it does not."""
    x = torch.randn(12, 6)  # three regions of four patches
    y = x.clone()
    y[8:] += 3.0  # change the last region only
    for layers, depends in ((2, True), (1, False)):
        m = _model(hat_layers=layers, n_prototypes=1)  # one prototype (patch 0): the visual memory query is fixed
        with torch.no_grad():
            a, b = m.encode(x)[0], m.encode(y)[0]
        assert not torch.allclose(a[2], b[2])
        assert (not torch.allclose(a[0], b[0], atol=1e-6)) == depends


def test_memory_matrix_is_queried_by_both_sides() -> None:
    m = _model()
    x, toks = torch.randn(9, 6), torch.tensor([[Vocabulary.BOS, 5, 6]])
    with torch.no_grad():
        mem = m.encode(x)
        logits = m.decode(toks, mem)
        m.memory_matrix.mul_(3.0)
        assert not torch.allclose(m.encode(x), mem)  # visual side
        assert not torch.allclose(m.decode(toks, mem), logits)  # text side, same visual memory


def test_memory_query_keeps_topk_slots() -> None:
    torch.manual_seed(0)
    q = MemoryQuery(8, 1, topk=1, dropout=0.0).eval()
    query, memory = torch.randn(1, 3, 8), torch.randn(10, 8)
    with torch.no_grad():
        out = q(query, memory)
        best = (q.q(query) @ q.k(memory).T).argmax(-1)[0]  # top-1: the response is that slot's value
        assert torch.allclose(out[0], q.o(q.v(memory)[best]), atol=1e-6)
        q.topk = 10  # all slots: plain softmax attention
        scores = (q.q(query) @ q.k(memory).T) / math.sqrt(8)
        assert torch.allclose(q(query, memory), q.o(scores.softmax(-1) @ q.v(memory)), atol=1e-6)


def test_padded_batch_equals_one_slide_at_a_time() -> None:
    m = _model()
    bags = [torch.randn(11, 6), torch.randn(3, 6)]
    x = torch.zeros(2, 11, 6)
    mask = torch.ones(2, 11, dtype=torch.bool)
    for i, f in enumerate(bags):
        x[i, : len(f)], mask[i, : len(f)] = f, False
    toks = torch.tensor([[1, 5, 6, 7], [1, 8, 0, 0]])
    with torch.no_grad():
        both = m(x, toks, mask)
        for i, f in enumerate(bags):
            t = 4 if i == 0 else 2
            assert torch.allclose(both[i, :t], m(f, toks[i : i + 1, :t])[0], atol=1e-5)
        assert m.greedy_batch(x, mask) == [m.greedy(f) for f in bags]
        # the exported step equals the teacher-forced step on an unpadded prefix
        mem = m.encode(bags[0])
        assert torch.allclose(m.export_step(toks[:1], mem), m.step(toks[:1], mem), atol=1e-5)


def test_histgen_learns_and_decodes() -> None:
    """Two classes of bags, two fixed reports: HistGen must map each bag to its report (greedy and beam)."""
    toy = train_toy_reports(lambda vocab: _model(vocab=vocab))
    for c in (0, 1):
        x = toy.bag(c)
        assert toy.vocab.decode(toy.model.greedy(x)) == toy.expected(c)
        assert toy.vocab.decode(toy.model.beam_search(x, beam=3)) == toy.expected(c)


def test_arch_factory_and_checkpoint_round_trip(tmp_path) -> None:
    sizes = {"d_model": 32, "n_memory": 4, "encoder_layers": 1, "heads": 2} | TINY
    hg = build_report_model(report_kwargs("histgen", sizes, n_features=6, vocab_size=30))
    rs = build_report_model(report_kwargs("resampler", sizes, n_features=6, vocab_size=30))
    assert isinstance(hg, HistGenGenerator) and isinstance(rs, ReportGenerator)
    assert "n_memory" not in hg.config and "region_size" not in rs.config
    legacy = dict(rs.config)
    legacy.pop("arch")  # configs saved before HistGen existed
    assert isinstance(build_report_model(legacy), ReportGenerator)
    with pytest.raises(ValueError, match="unknown report architecture"):
        build_report_model({**hg.config, "arch": "r2gen"})

    path = save_head(tmp_path / "report.pt", hg, {"vocabulary": {"itos": [str(i) for i in range(30)]}})
    loaded, config, itos = load_report_generator(path)
    assert isinstance(loaded, HistGenGenerator) and config == hg.config and len(itos) == 30
    x = torch.randn(7, 6)
    hg.eval()
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), hg.encode(x))


def test_report_config_selects_the_arch() -> None:
    from training.downstream.config import ReportConfig

    assert ReportConfig().arch == "histgen"
    assert ReportConfig(arch="resampler").arch == "resampler"
    with pytest.raises(ValueError):
        ReportConfig(arch="r2gen")


def test_histgen_exports_with_a_dynamic_number_of_regions(tmp_path) -> None:
    """Both graphs take any number of patches / regions and equal PyTorch; greedy decoding over the two
    onnxruntime graphs (the loop the service runs) gives the PyTorch model's tokens."""
    import onnxruntime as ort

    from training.export.bundle import export_report_generator

    m = _model(vocab=40)
    specs, parity = export_report_generator(m, tmp_path, in_dim=6)
    assert all(p.ok for p in parity)
    enc, dec = specs
    assert enc.outputs[0].shape == ["n_regions", 32]
    assert dec.inputs[1].shape == ["batch", "n_regions", 32]
    s_enc = ort.InferenceSession(str(tmp_path / enc.file), providers=["CPUExecutionProvider"])
    s_dec = ort.InferenceSession(str(tmp_path / dec.file), providers=["CPUExecutionProvider"])
    for n in (2, 37):
        feats = np.random.default_rng(n).standard_normal((n, 6)).astype(np.float32)
        memory = s_enc.run(None, {"features": feats})[0][None]
        assert memory.shape[1] == math.ceil(n / 4)
        seq = [Vocabulary.BOS]
        for _ in range(m.max_len):
            step = s_dec.run(None, {"tokens": np.asarray([seq], dtype=np.int64), "memory": memory})[0][0]
            step[[Vocabulary.PAD, Vocabulary.BOS, Vocabulary.UNK]] = -np.inf
            if int(step.argmax()) == Vocabulary.EOS:
                break
            seq.append(int(step.argmax()))
        assert seq[1:] == m.greedy(torch.from_numpy(feats))


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="region_size"):
        HistGenGenerator(6, 30, **(TINY | {"region_size": 1}))
    with pytest.raises(ValueError, match="divisible"):
        HistGenGenerator(6, 30, **(TINY | {"heads": 5}))
    with pytest.raises(InvalidParameterError):
        load_report_generator("/nonexistent/report.pt")


def test_word_embeddings_start_at_the_scale_of_the_positions() -> None:
    """× √d, a word starts unit-sized per dimension like the sinusoidal positions (with PyTorch's N(0, 1) it would be
    √d times larger and the decoder would start as a word-bigram model that hardly reads the slide)."""
    m = HistGenGenerator(6, 500, d_model=64, heads=2, d_ff=64, region_size=5, n_prototypes=8, cmm_size=32, topk=8)
    scaled = m.embed.weight[Vocabulary.PAD + 1 :] * math.sqrt(64)
    assert 0.8 < float(scaled.std()) < 1.2
    assert float(m.embed.weight[Vocabulary.PAD].abs().max()) == 0.0
