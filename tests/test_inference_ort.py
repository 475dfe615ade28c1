"""onnxruntime in-process backend on a real exported bundle: equals PyTorch, refuses bad input and bad bundles."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from inference_fixtures import BIN_EDGES, LABELS, PATCH, build_tiny_bundle, real_patches, tiny_models

from service.errors import BundleError, InvalidParameterError
from service.inference.backend import Backend
from service.inference.bundle import load_bundle
from service.inference.ort_backend import OrtBackend, choose_providers
from training.export.wrappers import U8PatchEncoder


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    return build_tiny_bundle(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def backend(bundle_dir: Path):
    with OrtBackend(load_bundle(bundle_dir), device="cpu", max_chunk=8) as b:
        yield b


@pytest.fixture(scope="module")
def models(bundle_dir: Path) -> dict:
    return tiny_models(bundle_dir.parent)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_manifest_describes_the_export(bundle_dir: Path) -> None:
    b = load_bundle(bundle_dir)
    m = b.manifest
    assert m.demo and m.name == "tiny" and m.embed_dim == 96 and m.slide_dim == 64
    assert m.preprocessing.patch_size == PATCH and m.preprocessing.uint8_input
    assert [x.name for x in m.models] == [
        "mstar_patch_encoder",
        "mstar_aggregator",
        "subtype",
        "survival",
        "mstar_text_encoder",
        "mstar_report_encoder",
        "mstar_report_decoder",
    ]
    assert b.model("subtype").labels == LABELS and b.model("survival").bin_edges == BIN_EDGES
    assert m.provenance.run_id == "tiny" and m.provenance.source == "mstar export"
    parity = json.loads((bundle_dir / "parity.json").read_text())
    assert all(p["ok"] for p in parity) and len(parity) == 7


def test_embed_real_patches_matches_torch(backend: OrtBackend, models: dict) -> None:
    assert isinstance(backend, Backend)
    px = real_patches(19)  # > max_chunk: three chunks, concatenated in order
    got = backend.embed_patches(px)
    ref_mod = U8PatchEncoder(models["encoder"], (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)).eval()
    with torch.no_grad():
        ref = ref_mod(torch.from_numpy(px)).numpy()
    assert got.shape == (19, 96) and got.dtype == np.float32
    assert np.abs(got - ref).max() < 1e-3
    assert _cos(got, ref).min() > 0.9999
    # the in-graph normalisation is the one the training side uses (training.models.patch_encoder)
    from training.models.patch_encoder import Preprocessing

    with torch.no_grad():
        ref2 = models["encoder"](Preprocessing(PATCH)(torch.from_numpy(px))).numpy()
    assert np.abs(got - ref2).max() < 1e-3
    # a single patch [S, S, 3] gets a batch axis
    assert backend.embed_patches(px[0]).shape == (1, 96)


@pytest.mark.parametrize("n", [1, 5, 260])
def test_aggregate_matches_torch(backend: OrtBackend, models: dict, n: int) -> None:
    feats = np.random.default_rng(n).standard_normal((n, 96)).astype(np.float32)
    out = backend.aggregate(feats)
    with torch.no_grad():
        ref = models["aggregator"](torch.from_numpy(feats)[None])
    assert out["embedding"].shape == (64,) and out["attention"].shape == (n,) and out["tokens"].shape == (n, 64)
    assert np.abs(out["embedding"] - ref.embedding[0].numpy()).max() < 1e-3
    assert np.abs(out["attention"] - ref.attention[0].numpy()).max() < 1e-4
    assert _cos(out["tokens"], ref.tokens[0].numpy()).min() > 0.9999


def test_heads_summarised(backend: OrtBackend, models: dict) -> None:
    feats = np.random.default_rng(7).standard_normal((40, 96)).astype(np.float32)
    res = backend.run_heads(feats)
    probs = res["subtype"]["probabilities"]
    assert list(probs) == LABELS and sum(probs.values()) == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():
        ref = models["survival"](torch.from_numpy(feats)[None])
    assert res["survival"]["risk"] == pytest.approx(float(ref.risk[0]), abs=1e-4)
    assert res["survival"]["survival"] == pytest.approx(ref.survival[0].tolist(), abs=1e-5)


def test_bad_inputs_are_typed_errors(backend: OrtBackend) -> None:
    with pytest.raises(InvalidParameterError, match="expected uint8"):
        backend.embed_patches(np.zeros((2, PATCH, PATCH, 3), dtype=np.float32))
    with pytest.raises(InvalidParameterError, match="expected shape"):
        backend.embed_patches(np.zeros((2, 64, 64, 3), dtype=np.uint8))
    with pytest.raises(InvalidParameterError, match="empty"):
        backend.aggregate(np.zeros((0, 96), dtype=np.float32))
    with pytest.raises(InvalidParameterError, match="takes inputs"):
        backend.infer("mstar_aggregator", {"x": np.zeros((3, 96), dtype=np.float32)})
    with pytest.raises(BundleError, match="no model"):
        backend.run_head("nope", np.zeros((3, 96), dtype=np.float32))
    h = backend.health()
    assert h["ok"] and h["providers"] == ["CPUExecutionProvider"]


def test_onnx_disagreeing_with_manifest_refused(bundle_dir: Path, tmp_path: Path) -> None:
    dst = tmp_path / "b"
    shutil.copytree(bundle_dir, dst)
    doc = json.loads((dst / "bundle.json").read_text())
    doc["models"][1]["outputs"][0]["name"] = "slide_vec"
    (dst / "bundle.json").write_text(json.dumps(doc))
    b = OrtBackend(load_bundle(dst), device="cpu")
    with pytest.raises(BundleError, match="no output 'slide_vec'"):
        b.aggregate(np.zeros((4, 96), dtype=np.float32))
    # a truncated ONNX with a matching checksum in the manifest is still refused cleanly
    f = dst / doc["models"][2]["file"]
    f.write_bytes(f.read_bytes()[:1000])
    from service.inference.bundle import sha256_file

    doc["models"][2]["sha256"] = sha256_file(f)
    doc["models"][1]["outputs"][0]["name"] = "embedding"
    (dst / "bundle.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError, match="cannot load"):
        OrtBackend(load_bundle(dst), device="cpu", preload=True)


def test_gpu_providers_refused_without_gpu_build() -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    from service.errors import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match="CUDAExecutionProvider"):
        choose_providers("cuda")
    assert choose_providers("auto") == ["CPUExecutionProvider"]


def test_report_generation_matches_torch_greedy(backend: OrtBackend, models: dict) -> None:
    from service.inference import report

    assert report.available(backend.bundle)
    for n in (3, 150):
        feats = np.random.default_rng(n).standard_normal((n, 96)).astype(np.float32)
        got = report.generate_report(backend, feats)
        want = models["report"].greedy(torch.from_numpy(feats))
        assert got["token_ids"] == want
        assert got["text"] == models["vocab"].decode(want)
        assert report.generate(backend.bundle, backend, feats) == got["text"]


def test_served_zeroshot_equals_the_evaluated_one(backend: OrtBackend, models: dict) -> None:
    """The service's probabilities are those `training.downstream.zeroshot` evaluates for the same slide and prompts
    (one prompt per class): official MI-Zero top-k over the aggregator's patch tokens at logit scale 14.29."""
    from service.inference import zeroshot
    from training.downstream.zeroshot import LOGIT_SCALE, PromptSet, class_embeddings, mi_zero_scores

    spec = backend.bundle.manifest.zeroshot
    assert spec is not None and (spec.method, spec.logit_scale, spec.topk) == ("mi_zero_topk", 14.29, 50)
    prompts = ["squamous cell carcinoma", "benign lung parenchyma with no tumour", "adenocarcinoma, acinar"]
    feats = np.random.default_rng(11).standard_normal((60, 96)).astype(np.float32)
    res = zeroshot.score(backend.bundle, backend, feats, None, prompts)

    def encode(texts: list[str]) -> torch.Tensor:
        tok = models["text"].tokenize(texts)
        return models["text_proj"](models["text"](tok["input_ids"], tok["attention_mask"]))

    with torch.no_grad():
        w = class_embeddings(encode, PromptSet(["CLASSNAME"], {p: [p] for p in prompts}), prompts)
        tokens = models["aggregator"](torch.from_numpy(feats)[None]).tokens[0]
        logits = mi_zero_scores(tokens, w, [50])[50]
        probs = torch.softmax(LOGIT_SCALE * logits.double(), -1).numpy()
    assert res["method"] == "mi_zero_topk" and res["logit_scale"] == LOGIT_SCALE and res["topk"] == 50
    assert [p["cosine"] for p in res["prompts"]] == pytest.approx(logits.tolist(), abs=1e-5)
    assert [p["probability"] for p in res["prompts"]] == pytest.approx(probs.tolist(), abs=1e-4)
    assert res["best"] == prompts[int(logits.argmax())]
    with pytest.raises(InvalidParameterError, match="prompts"):
        zeroshot.score(backend.bundle, backend, feats, None, [])
    assert "warnings" not in res and not any("truncated" in p for p in res["prompts"])
    # past the tokenizer's limit two prompts that differ only in their ends scored the same, without a word
    limit = backend.bundle.manifest.tokenizer.max_length
    long = ["tumour " * limit + "benign lesion", "tumour " * limit + "metastatic high grade carcinoma"]
    cut = zeroshot.score(backend.bundle, backend, feats, None, [*long, "normal"])
    assert [p.get("truncated", False) for p in cut["prompts"]] == [True, True, False]
    assert cut["prompts"][0]["cosine"] == pytest.approx(cut["prompts"][1]["cosine"], abs=1e-6)
    assert len(cut["warnings"]) == 2 and f"{limit} tokens and was cut" in cut["warnings"][0]


def test_zeroshot_method_comes_from_the_manifest(bundle_dir: Path, models: dict, tmp_path: Path) -> None:
    """A bundle recording `slide_level` scores the slide embedding; a manifest from before the field loads and is
    served with the official defaults."""
    from service.inference import zeroshot

    copy = tmp_path / "b"
    shutil.copytree(bundle_dir, copy)
    manifest = json.loads((copy / "bundle.json").read_text())
    manifest["zeroshot"] = {"method": "slide_level", "logit_scale": 100.0}
    (copy / "bundle.json").write_text(json.dumps(manifest))
    prompts = ["squamous cell carcinoma", "adenocarcinoma, acinar"]
    feats = np.random.default_rng(3).standard_normal((20, 96)).astype(np.float32)
    with OrtBackend(load_bundle(copy), device="cpu") as b:
        res = zeroshot.score(b.bundle, b, feats, None, prompts)
    tok = models["text"].tokenize(prompts)
    with torch.no_grad():
        t = models["text_proj"](models["text"](tok["input_ids"], tok["attention_mask"])).numpy()
        s = models["aggregator"](torch.from_numpy(feats)[None]).embedding[0].numpy()
    cos = t @ s / np.linalg.norm(t, axis=-1) / np.linalg.norm(s)
    assert res["method"] == "slide_level" and res["logit_scale"] == 100.0
    assert [p["cosine"] for p in res["prompts"]] == pytest.approx(cos.tolist(), abs=1e-5)
    del manifest["zeroshot"]
    (copy / "bundle.json").write_text(json.dumps(manifest))
    assert load_bundle(copy).zeroshot.method == "mi_zero_topk" and load_bundle(copy).zeroshot.logit_scale == 14.29
    manifest["zeroshot"] = {"method": "nearest", "logit_scale": -1}
    (copy / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="zeroshot"):
        load_bundle(copy)


def test_each_model_call_is_timed_for_metrics(backend: OrtBackend) -> None:
    """`on_infer` sees one (model, seconds) per session run: three chunks of 8 for 19 patches, then the aggregator."""
    calls: list[tuple[str, float]] = []
    backend.on_infer = lambda model, seconds: calls.append((model, seconds))
    try:
        feats = backend.embed_patches(real_patches(19))
        backend.aggregate(feats)
    finally:
        backend.on_infer = None
    names = [m for m, _ in calls]
    assert len(names) == 4 and names[0] == names[1] == names[2] != names[3]
    assert all(0 < s < 30 for _, s in calls)
