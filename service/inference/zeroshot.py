"""Zero-shot scoring of free-text prompts at request time (text encoder + tokenizer from the bundle).

Prompts are tokenised with the bundle's `tokenizer.json` (the `tokenizers` library: no torch, same ids as the
training-side HF fast tokenizer), embedded by the exported text tower (BERT CLS -> `proj_text`, i.e. the
Stage-1 shared space) and compared with the slide embedding by cosine similarity, as in mSTAR's zero-shot
evaluation; probabilities are a softmax over the prompts at CLIP's temperature (logit scale 100).
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

import numpy as np

from service.errors import BundleError, InvalidParameterError
from service.inference.backend import softmax

if TYPE_CHECKING:
    from service.inference.backend import BundleBackend
    from service.inference.bundle import Bundle

LOGIT_SCALE = 100.0
MAX_PROMPTS = 64
MAX_PROMPT_CHARS = 1000


def available(bundle: Bundle) -> bool:
    return bundle.text_encoder is not None and bundle.tokenizer_path is not None


@cache
def _tokenizer(path: str, max_length: int):
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(path)
    except Exception as err:  # the Rust loader raises untyped errors for a bad file
        raise BundleError(f"cannot load tokenizer {path}: {err}") from err
    pad_id = tok.token_to_id("[PAD]")
    tok.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")
    tok.enable_truncation(max_length)
    return tok


def embed_prompts(bundle: Bundle, backend: BundleBackend, prompts: list[str]) -> np.ndarray:
    """Prompt embeddings [P, E] in the slide-embedding space (not normalised)."""
    spec = bundle.text_encoder
    if spec is None or bundle.manifest.tokenizer is None:
        raise BundleError("this bundle has no text encoder")
    if not prompts or len(prompts) > MAX_PROMPTS:
        raise InvalidParameterError(f"give between 1 and {MAX_PROMPTS} prompts")
    if any(not p.strip() or len(p) > MAX_PROMPT_CHARS for p in prompts):
        raise InvalidParameterError(f"prompts must be non-empty and at most {MAX_PROMPT_CHARS} characters")
    tok = _tokenizer(str(bundle.tokenizer_path), bundle.manifest.tokenizer.max_length)
    enc = tok.encode_batch(prompts)
    ids = np.asarray([e.ids for e in enc], dtype=np.int64)
    mask = np.asarray([e.attention_mask for e in enc], dtype=np.int64)
    out = backend.infer_batched(spec.name, {"input_ids": ids, "attention_mask": mask})
    return out[spec.outputs[0].name]


def score(
    bundle: Bundle, backend: BundleBackend, feats: np.ndarray, slide_emb: np.ndarray | None, prompts: list[str]
) -> dict:
    """Cosine similarity of each prompt with the slide embedding, and a softmax over the prompts."""
    if slide_emb is None:
        if bundle.aggregator is None:
            raise BundleError("zero-shot scoring needs a slide embedding (this bundle has no aggregator)")
        slide_emb = backend.aggregate(feats)["embedding"]
    text = embed_prompts(bundle, backend, prompts)
    s = np.asarray(slide_emb, dtype=np.float64).reshape(-1)
    if text.shape[-1] != s.size:
        raise BundleError(f"text embeddings are {text.shape[-1]}-d but the slide embedding is {s.size}-d")
    t = text.astype(np.float64)
    cos = (t @ s) / (np.linalg.norm(t, axis=-1) * np.linalg.norm(s) + 1e-12)
    probs = softmax(LOGIT_SCALE * cos)
    best = int(cos.argmax())
    return {
        "prompts": [
            {"prompt": p, "cosine": float(c), "probability": float(q)}
            for p, c, q in zip(prompts, cos, probs, strict=True)
        ],
        "best": prompts[best],
        "logit_scale": LOGIT_SCALE,
    }
