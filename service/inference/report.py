"""Draft report generation without torch: the decoding loop over the bundle's two report graphs.

`mstar_report_encoder` runs once per slide (patch features -> memory: a fixed number of rows for the resampler,
one per region for HistGen), `mstar_report_decoder` once per token. Greedy decoding matches
`training.models.report_decoder.ReportModel.greedy` for both architectures: <pad>, <bos> and <unk> are never
emitted, <eos> stops. The loop runs on any `Backend` (onnxruntime or Triton).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np

from service.errors import BundleError
from service.inference.backend import BundleBackend
from service.inference.bundle import Bundle


@cache
def _load_vocab(path: str, mtime: float) -> dict:
    doc = json.loads(Path(path).read_text())
    if not isinstance(doc.get("itos"), list) or len(doc["itos"]) < 4:
        raise BundleError(f"report vocabulary {path} has no 'itos' list")
    return doc


def load_vocab(backend: BundleBackend) -> dict:
    spec = backend.bundle.manifest.report_vocab
    if spec is None:
        raise BundleError(f"bundle {backend.bundle.root} has no report vocabulary")
    path = backend.bundle.root / spec.path
    return _load_vocab(str(path), path.stat().st_mtime)


def generate_report(backend: BundleBackend, features: np.ndarray, *, max_len: int | None = None) -> dict:
    """Greedy draft report for one slide's patch features [N, D]: {"text", "token_ids"}."""
    models = backend.bundle.report_models
    if models is None:
        raise BundleError(f"bundle {backend.bundle.root} has no report generator")
    enc, dec = models
    vocab = load_vocab(backend)
    itos = vocab["itos"]
    pad, bos, eos, unk = (int(vocab[k]) for k in ("pad", "bos", "eos", "unk"))
    limit = max_len or backend.bundle.manifest.report_vocab.max_len
    memory = backend.infer(enc.name, {enc.inputs[0].name: np.asarray(features, dtype=np.float32)})["memory"]
    memory = memory[None]
    seq = [bos]
    for _ in range(limit):
        logits = backend.infer(dec.name, {"tokens": np.asarray([seq], dtype=np.int64), "memory": memory})["logits"]
        step = logits[0].astype(np.float64)
        step[[pad, bos, unk]] = -np.inf
        nxt = int(step.argmax())
        if nxt == eos:
            break
        seq.append(nxt)
    ids = seq[1:]
    return {"text": " ".join(itos[i] for i in ids), "token_ids": ids}


def available(bundle: Bundle) -> bool:
    """Whether `bundle` can draft reports (the pipeline's check)."""
    return bundle.report_models is not None and bundle.manifest.report_vocab is not None


def generate(bundle: Bundle, backend: BundleBackend, features: np.ndarray) -> str:
    """The pipeline's call: the greedy draft report text for one slide."""
    if backend.bundle is not bundle and backend.bundle.root != bundle.root:
        raise BundleError("backend and bundle differ")
    return generate_report(backend, features)["text"]
