"""Bundle manifest validation: what the service refuses at start-up (no torch, no ONNX needed)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from service.errors import BundleError
from service.inference.backend import summarize_head
from service.inference.bundle import MANIFEST_NAME, load_bundle, parse_manifest, sha256_file


def _write(root: Path, rel: str, data: bytes) -> str:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return sha256_file(p)


def _manifest(root: Path) -> dict:
    enc_sha = _write(root, "enc/1/model.onnx", b"encoder-bytes")
    agg_sha = _write(root, "agg/1/model.onnx", b"aggregator-bytes")
    cls_sha = _write(root, "cls/1/model.onnx", b"head-bytes")
    return {
        "schema_version": 1,
        "name": "t",
        "demo": True,
        "embed_dim": 8,
        "slide_dim": 4,
        "preprocessing": {"patch_size": 16, "target_mpp": 0.5, "uint8_input": True},
        "models": [
            {
                "name": "enc",
                "role": "patch_encoder",
                "file": "enc/1/model.onnx",
                "sha256": enc_sha,
                "max_batch_size": 32,
                "inputs": [{"name": "pixels_u8", "dtype": "uint8", "shape": ["batch", 16, 16, 3]}],
                "outputs": [{"name": "embedding", "dtype": "float32", "shape": ["batch", 8]}],
            },
            {
                "name": "agg",
                "role": "aggregator",
                "file": "agg/1/model.onnx",
                "sha256": agg_sha,
                "inputs": [{"name": "features", "dtype": "float32", "shape": ["n", 8]}],
                "outputs": [{"name": "embedding", "dtype": "float32", "shape": [4]}],
            },
            {
                "name": "cls",
                "role": "classifier",
                "file": "cls/1/model.onnx",
                "sha256": cls_sha,
                "labels": ["a", "b"],
                "consumes": "patch_features",
                "inputs": [{"name": "features", "dtype": "float32", "shape": ["n", 8]}],
                "outputs": [{"name": "logits", "dtype": "float32", "shape": [2]}],
            },
        ],
        "provenance": {"source": "test", "created": "2026-01-01T00:00:00Z", "git_commit": "abc"},
    }


def _save(root: Path, doc: dict) -> Path:
    (root / MANIFEST_NAME).write_text(json.dumps(doc))
    return root


def test_valid_bundle_loads(tmp_path: Path) -> None:
    b = load_bundle(_save(tmp_path, _manifest(tmp_path)))
    assert b.patch_encoder.name == "enc"
    assert b.aggregator.name == "agg"
    assert [h.name for h in b.heads] == ["cls"]
    assert b.path("enc") == tmp_path / "enc/1/model.onnx"
    assert b.manifest.preprocessing.mean == (0.485, 0.456, 0.406)
    with pytest.raises(BundleError, match="no model 'nope'"):
        b.model("nope")


def test_missing_manifest_and_bad_json(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no bundle manifest"):
        load_bundle(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(BundleError, match="not readable JSON"):
        load_bundle(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("[1, 2]")
    with pytest.raises(BundleError, match="JSON object"):
        load_bundle(tmp_path)


def test_missing_file_and_checksum_refused(tmp_path: Path) -> None:
    doc = _manifest(tmp_path)
    _save(tmp_path, doc)
    (tmp_path / "agg/1/model.onnx").write_bytes(b"tampered")
    with pytest.raises(BundleError, match="fails its checksum"):
        load_bundle(tmp_path)
    assert load_bundle(tmp_path, verify_checksums=False).aggregator is not None
    (tmp_path / "cls/1/model.onnx").unlink()
    with pytest.raises(BundleError, match=r"'cls'.*missing"):
        load_bundle(tmp_path, verify_checksums=False)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(schema_version=2), "schema_version 2"),
        (lambda d: d["models"][2].pop("labels"), "needs class labels"),
        (lambda d: d["preprocessing"].update(patch_size=224), "does not match preprocessing"),
        (lambda d: d.update(embed_dim=16), "is not \\[batch, 16\\]"),
        (lambda d: d["models"].pop(0), "exactly one patch_encoder"),
        (lambda d: d["models"][1].update(file="../outside.onnx"), "relative path inside the bundle"),
        (lambda d: d["models"][1].update(name="enc"), "duplicate model names"),
        (lambda d: d["models"][1].update(sha256="xyz"), "models.1.sha256"),
        (lambda d: d.update(unknown_field=1), "unknown_field"),
        (lambda d: d["preprocessing"].update(target_mpp=72.0), "target_mpp"),
        (lambda d: d["models"][2].update(role="survival", bin_edges=[3.0, 1.0]), "must increase"),
        (lambda d: d["models"][2].update(role="text_encoder"), "needs a tokenizer"),
        # sizes the manifest contradicts itself on: each failed every job (zip() too short, a 1-interval curve)
        (lambda d: d["models"][2].update(labels=["a", "b", "c"]), "3 labels for 2 logits"),
        (lambda d: d["models"][2].update(role="survival", labels=None, bin_edges=[0.0, 5.0]), "2 bin edges for 2"),
    ],
)
def test_schema_violations_refused(tmp_path: Path, mutate, message: str) -> None:
    doc = _manifest(tmp_path)
    mutate(doc)
    with pytest.raises(BundleError, match=message):
        load_bundle(_save(tmp_path, doc))


def test_parse_manifest_round_trip(tmp_path: Path) -> None:
    m = parse_manifest(_manifest(tmp_path))
    assert parse_manifest(m.model_dump_json()) == m


def test_summarize_head_survival_and_classifier(tmp_path: Path) -> None:
    doc = _manifest(tmp_path)
    cls = parse_manifest(doc).models[2]
    out = summarize_head(cls, {"logits": np.array([0.0, np.log(3.0)], dtype=np.float32)})
    assert out["label"] == "b"
    assert out["probabilities"]["b"] == pytest.approx(0.75)
    doc["models"][2].update(role="survival", bin_edges=[0.0, 1.0, 2.0], labels=None)
    surv = parse_manifest(doc).models[2]
    logits = np.array([0.0, np.log(1 / 3)])  # hazards 0.5 and 0.25
    res = summarize_head(surv, {"logits": logits})
    assert res["hazards"] == pytest.approx([0.5, 0.25])
    assert res["survival"] == pytest.approx([0.5, 0.375])
    assert res["risk"] == pytest.approx(-0.875)


def test_a_model_file_that_loops_or_is_a_folder_is_refused_at_load(tmp_path: Path) -> None:
    """A symlink loop crashed `mstar serve` at start with a RuntimeError traceback; a folder skipped its checksum
    and failed only at first use, after a whole slide was tiled."""
    doc = _manifest(tmp_path)
    _save(tmp_path, doc)
    (tmp_path / "loop.onnx").symlink_to(tmp_path / "loop.onnx")
    doc["models"][1]["file"] = "loop.onnx"
    with pytest.raises(BundleError, match=r"'agg'.*cannot be resolved"):
        load_bundle(_save(tmp_path, doc))
    (tmp_path / "folder.onnx").mkdir()
    doc["models"][1]["file"] = "folder.onnx"
    with pytest.raises(BundleError, match=r"'agg' 'folder\.onnx' is not a file"):
        load_bundle(_save(tmp_path, doc))


def test_the_demo_bundle_s_files_are_checked_against_the_manifest_and_the_graphs(
    tmp_path: Path, tmp_path_factory
) -> None:
    """A report vocabulary shorter than the decoder's logits (IndexError in every report), a graph whose fixed
    sizes disagree with the manifest (a raw onnxruntime error in every job), and a model file replaced under a
    running worker (served unverified, the result naming the old checksum) are each refused with the reason."""
    import shutil

    from inference_fixtures import build_tiny_bundle

    from service.inference.ort_backend import OrtBackend

    src = build_tiny_bundle(tmp_path_factory.getbasetemp())
    root = tmp_path / "b"
    shutil.copytree(src, root)
    doc = json.loads((root / MANIFEST_NAME).read_text())
    vocab = json.loads((root / doc["report_vocab"]["path"]).read_text())
    short = {**vocab, "itos": vocab["itos"][:-1]}
    (root / "short_vocab.json").write_text(json.dumps(short))
    bad = {**doc, "report_vocab": {**doc["report_vocab"], "path": "short_vocab.json"}}
    bad["report_vocab"]["sha256"] = sha256_file(root / "short_vocab.json")
    with pytest.raises(BundleError, match=f"{len(vocab['itos']) - 1} words for {len(vocab['itos'])} decoder logits"):
        load_bundle(_save(root, bad))

    head = next(m for m in doc["models"] if m["role"] == "classifier")
    width = head["inputs"][0]["shape"][-1]
    wrong = json.loads(json.dumps(doc))
    next(m for m in wrong["models"] if m["name"] == head["name"])["inputs"][0]["shape"][-1] = width + 1
    wrong["embed_dim"] = doc["embed_dim"]
    backend = OrtBackend(load_bundle(_save(root, wrong)), device="cpu")
    with pytest.raises(BundleError, match=rf"{head['name']!r} input 'features': ONNX is .*{width}\]"):
        backend.session(head["name"])

    _save(root, doc)
    loaded = load_bundle(root)
    assert head["file"] in loaded.verified  # opened unchanged, it is not hashed a second time
    backend = OrtBackend(loaded, device="cpu")
    original = (src / head["file"]).read_bytes()
    time.sleep(0.05)  # past the file system's timestamp granularity: the rewrite gets another mtime
    (root / head["file"]).write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # same size, rewritten in place
    with pytest.raises(BundleError, match="changed since the bundle was loaded"):
        backend.session(head["name"])
    (root / head["file"]).write_bytes(original + b"\0")  # replaced after the load
    with pytest.raises(BundleError, match="changed since the bundle was loaded"):
        backend.session(head["name"])


def test_prompts_without_the_zeroshot_task_and_blank_prompts_are_decided_at_submit() -> None:
    """Prompts with tasks that leave zero-shot out were ignored (the job succeeded without them); a blank prompt
    was accepted and failed the job after the whole analysis. Prompts alone now enable zero-shot, as `mstar
    analyze --prompt` does; with explicit tasks they are refused, and so is a blank prompt, before any work."""
    from pydantic import ValidationError

    from service.api.schemas import AnalysisRequest

    assert AnalysisRequest(prompts=["tumour", "normal"]).tasks[-1] == "zeroshot"
    with pytest.raises(ValidationError, match="add 'zeroshot' to tasks"):
        AnalysisRequest(tasks=["embedding"], prompts=["tumour", "normal"])
    with pytest.raises(ValidationError, match=r"prompts\.1"):
        AnalysisRequest(tasks=["zeroshot"], prompts=["tumour", "   "])
