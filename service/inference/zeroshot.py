"""Zero-shot scoring of free-text prompts at request time (text encoder + tokenizer from the bundle).

Prompts are tokenised with the bundle's `tokenizer.json` (the `tokenizers` library: no torch, same ids as the
training-side HF fast tokenizer), embedded by the exported text tower (BERT CLS -> `proj_text`, i.e. the
Stage-1 shared space) and scored with the method the bundle manifest records (`ZeroShotSpec`, the same code
the training-side evaluation uses): by default the official MI-Zero top-k over the aggregator's per-patch tokens,
probabilities a softmax over the prompts at the official logit scale 14.29. Each prompt is one class.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

import numpy as np

from service.errors import BundleError, InvalidParameterError

if TYPE_CHECKING:
    from service.inference.backend import BundleBackend
    from service.inference.bundle import Bundle

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


def check_prompts(prompts: list[str] | tuple[str, ...]) -> None:
    """Between 1 and `MAX_PROMPTS` prompts, none blank or over `MAX_PROMPT_CHARS` characters."""
    if not prompts or len(prompts) > MAX_PROMPTS:
        raise InvalidParameterError(f"give between 1 and {MAX_PROMPTS} prompts")
    if any(not p.strip() or len(p) > MAX_PROMPT_CHARS for p in prompts):
        raise InvalidParameterError(f"prompts must be non-empty and at most {MAX_PROMPT_CHARS} characters")


def embed_prompts(bundle: Bundle, backend: BundleBackend, prompts: list[str]) -> np.ndarray:
    """Prompt embeddings [P, E] in the slide-embedding space (not normalised)."""
    spec = bundle.text_encoder
    if spec is None or bundle.manifest.tokenizer is None:
        raise BundleError("this bundle has no text encoder")
    check_prompts(prompts)
    tok = _tokenizer(str(bundle.tokenizer_path), bundle.manifest.tokenizer.max_length)
    enc = tok.encode_batch(prompts)
    ids = np.asarray([e.ids for e in enc], dtype=np.int64)
    mask = np.asarray([e.attention_mask for e in enc], dtype=np.int64)
    out = backend.infer_batched(spec.name, {"input_ids": ids, "attention_mask": mask})
    return out[spec.outputs[0].name]


def score(
    bundle: Bundle, backend: BundleBackend, feats: np.ndarray, slide_emb: np.ndarray | None, prompts: list[str]
) -> dict:
    """Logit of each prompt (one class each) by the bundle's zero-shot method, and a softmax over the prompts."""
    spec = bundle.zeroshot
    tokens = None
    if spec.method == "mi_zero_topk" or slide_emb is None:
        if bundle.aggregator is None:
            raise BundleError("zero-shot scoring needs the aggregator (this bundle has none)")
        out = backend.aggregate(feats)
        tokens = out.get("tokens")
        slide_emb = out["embedding"] if slide_emb is None else slide_emb
        if spec.method == "mi_zero_topk" and tokens is None:
            raise BundleError("this bundle's aggregator does not output per-patch tokens, needed by MI-Zero")
    text = embed_prompts(bundle, backend, prompts)
    width = (tokens if spec.method == "mi_zero_topk" else np.reshape(slide_emb, (1, -1))).shape[-1]
    if text.shape[-1] != width:
        raise BundleError(f"text embeddings are {text.shape[-1]}-d but the slide's embeddings are {width}-d")
    logits = spec.logits(text, tokens, slide_emb)
    probs = spec.probabilities(logits)
    best = int(logits.argmax())
    cut = truncated_prompts(bundle, prompts)
    out = {
        "prompts": [
            {"prompt": p, "cosine": float(c), "probability": float(q), **({"truncated": True} if i in cut else {})}
            for i, (p, c, q) in enumerate(zip(prompts, logits, probs, strict=True))
        ],
        "best": prompts[best],
        "method": spec.method,
        "topk": spec.topk if spec.method == "mi_zero_topk" else None,
        "logit_scale": spec.logit_scale,
    }
    if cut:
        # past the tokenizer's limit the text encoder never sees the rest: two prompts differing only there score
        # the same, which is worth saying rather than leaving the user to wonder
        out["warnings"] = [
            f"prompt {i + 1} is longer than the text encoder's {bundle.manifest.tokenizer.max_length} tokens and was "
            "cut: only its beginning was scored"
            for i in sorted(cut)
        ]
    return out


def truncated_prompts(bundle: Bundle, prompts: list[str]) -> set[int]:
    """Indices of the prompts the tokenizer cut at its `max_length`."""
    tok = _tokenizer(str(bundle.tokenizer_path), bundle.manifest.tokenizer.max_length)
    return {i for i, enc in enumerate(tok.encode_batch(prompts)) if enc.overflowing}
