"""Report generation pieces shared by every architecture (vocabulary, `ReportModel`: teacher forcing, greedy and
beam search over `encode` + `step`), and the resampler architecture (`report.arch: resampler`), the smaller
alternative to HistGen (`training/models/histgen.py`, the default).

The resampler's design, and why it is simpler than HistGen:
- **Encoder**: patch features -> Linear(D→d)+ReLU -> a Perceiver-style resampler (`n_memory` learned queries
  cross-attend over *all* N patches), plus one mean-pooled token (HistGen's fc_feats) -> a small
  TransformerEncoder over those tokens -> memory `[B, M, d]`. HistGen reaches a fixed-size memory with
  region-wise attention (region 96) plus 512 linspace-sampled prototypes and a 2048-slot memory bank; a
  learned-query resampler gives the same property (cost linear in N, fixed-size memory, independent of patch
  order) with one module and no sampling heuristics, and exports to ONNX with a dynamic N.
- **Decoder**: `nn.TransformerDecoder`, 3 layers, d_model 512, d_ff 512, 8 heads, dropout 0.1 (HistGen's
  sizes), learned positions, causal mask.
- **Separable steps for export**: `encode(features) -> memory` runs once per slide; `step(tokens, memory) ->
  next logits` runs once per generated token. Greedy and beam search (beam 3, trigram blocking) are plain
  loops over `step`, so the service can run the same loop over two ONNX graphs.
- **Vocabulary**: lower-cased word/punctuation tokens with frequency ≥ `min_freq` in the training reports;
  <pad>=0, <bos>=1, <eos>=2, <unk>=3; max length 100.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

import torch
from torch import nn

_TOKEN_RE = re.compile(r"[a-z0-9]+(?:[-/'][a-z0-9]+)*|[.,;:%()+<>=]")


def tokenize(text: str) -> list[str]:
    """Lower-case word and punctuation tokens (other symbols dropped), the unit of the vocabulary
    and metrics."""
    return _TOKEN_RE.findall(str(text).lower())


def normalize(text: str) -> str:
    """The form in which references and generated reports are scored: tokens joined by single spaces."""
    return " ".join(tokenize(text))


class Vocabulary:
    PAD, BOS, EOS, UNK = 0, 1, 2, 3
    SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")

    def __init__(self, words: Iterable[str]) -> None:
        self.itos = list(self.SPECIALS) + [w for w in words if w not in self.SPECIALS]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @classmethod
    def build(cls, texts: Iterable[str], min_freq: int = 3) -> Vocabulary:
        counts = Counter(tok for t in texts for tok in tokenize(t))
        words = sorted(w for w, c in counts.items() if c >= min_freq)
        return cls(words)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str, max_len: int = 100) -> list[int]:
        """[BOS, tokens..., EOS], truncated to at most `max_len` tokens between BOS and EOS."""
        ids = [self.stoi.get(t, self.UNK) for t in tokenize(text)][:max_len]
        return [self.BOS, *ids, self.EOS]

    def decode(self, ids: Iterable[int]) -> str:
        words = []
        for i in ids:
            i = int(i)
            if i == self.EOS:
                break
            if i in (self.PAD, self.BOS):
                continue
            words.append(self.itos[i])
        return " ".join(words)

    def to_dict(self) -> dict:
        return {"itos": self.itos, "pad": self.PAD, "bos": self.BOS, "eos": self.EOS, "unk": self.UNK}

    @classmethod
    def from_dict(cls, d: dict) -> Vocabulary:
        return cls(d["itos"][len(cls.SPECIALS) :])


class ReportEncoder(nn.Module):
    """Patch features [B, N, D] -> memory [B, M, d] via learned-query cross-attention + a small
    transformer."""

    def __init__(
        self, n_features: int, d_model: int, n_memory: int, layers: int, heads: int, d_ff: int, dropout: float
    ) -> None:
        super().__init__()
        self.in_proj = nn.Sequential(nn.Linear(n_features, d_model), nn.ReLU(), nn.Dropout(dropout))
        self.queries = nn.Parameter(torch.randn(1, n_memory, d_model) * 0.02)
        self.resample = nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.pool_norm = nn.LayerNorm(d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, d_ff, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False) if layers > 0 else None

    def forward(self, features: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.in_proj(features.float())
        q = self.queries.expand(h.shape[0], -1, -1)
        mem, _ = self.resample(q, h, h, key_padding_mask=padding_mask, need_weights=False)
        mem = self.norm(mem + q)
        # plus the mean of the projected patches (HistGen's fc_feats): a direct global summary token
        if padding_mask is None:
            pooled = h.mean(1, keepdim=True)
        else:
            keep = (~padding_mask).unsqueeze(-1).to(h.dtype)
            pooled = (h * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp(min=1.0)
        mem = torch.cat([self.pool_norm(pooled), mem], dim=1)
        return self.encoder(mem) if self.encoder is not None else mem


class ReportModel(nn.Module):
    """What every report architecture shares: teacher forcing, greedy (one slide or a padded batch) and beam search.

    A subclass provides `encode_masked(features, padding_mask) -> (memory, memory_mask)` (once per slide;
    `memory_mask` is True at padded memory rows, or None), `decode(tokens, memory, memory_mask) -> logits`, and
    `export_step(tokens, memory)`: the exported decoder step, for unpadded input without data-dependent branches."""

    max_len: int

    def encode_masked(
        self, features: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def decode(
        self, tokens: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits `[B, T, V]` for every prefix of `tokens` `[B, T]` (teacher forcing)."""
        raise NotImplementedError

    def export_step(self, tokens: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, features: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run once per slide. features `[B, N, D]` (or `[N, D]`), padding_mask `[B, N]` True at padding."""
        if features.dim() == 2:
            features = features.unsqueeze(0)
        return self.encode_masked(features, padding_mask)[0]

    def step(self, tokens: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits `[B, V]` given the prefix `tokens` `[B, T]`."""
        return self.decode(tokens, memory, memory_mask)[:, -1]

    def forward(
        self, features: torch.Tensor, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if features.dim() == 2:
            features = features.unsqueeze(0)
        memory, memory_mask = self.encode_masked(features, padding_mask)
        return self.decode(tokens, memory, memory_mask)

    # ---- generation ------------------------------------------------------------------------------
    def _banned(self, logp: torch.Tensor) -> torch.Tensor:
        logp[..., Vocabulary.PAD] = float("-inf")
        logp[..., Vocabulary.BOS] = float("-inf")
        logp[..., Vocabulary.UNK] = float("-inf")
        return logp

    @torch.no_grad()
    def greedy(self, features: torch.Tensor, max_len: int | None = None) -> list[int]:
        memory = self.encode(features)
        seq = [Vocabulary.BOS]
        for _ in range(max_len or self.max_len):
            logp = self._banned(self.step(torch.tensor([seq], device=memory.device), memory).log_softmax(-1))
            nxt = int(logp[0].argmax())
            if nxt == Vocabulary.EOS:
                break
            seq.append(nxt)
        return seq[1:]

    @torch.no_grad()
    def greedy_batch(
        self, features: torch.Tensor, padding_mask: torch.Tensor | None = None, max_len: int | None = None
    ) -> list[list[int]]:
        """Greedy decoding of a padded batch of bags at once (validation-time model selection)."""
        if features.dim() == 2:
            features = features.unsqueeze(0)
        memory, memory_mask = self.encode_masked(features, padding_mask)
        b = memory.shape[0]
        toks = torch.full((b, 1), Vocabulary.BOS, dtype=torch.long, device=memory.device)
        done = torch.zeros(b, dtype=torch.bool, device=memory.device)
        for _ in range(max_len or self.max_len):
            nxt = self._banned(self.step(toks, memory, memory_mask).log_softmax(-1)).argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, Vocabulary.PAD), nxt)
            toks = torch.cat([toks, nxt.unsqueeze(1)], dim=1)
            done |= nxt == Vocabulary.EOS
            if bool(done.all()):
                break
        out = []
        for row in toks[:, 1:].tolist():
            seq = []
            for t in row:
                if t in (Vocabulary.EOS, Vocabulary.PAD):
                    break
                seq.append(t)
            out.append(seq)
        return out

    @torch.no_grad()
    def beam_search(
        self,
        features: torch.Tensor,
        beam: int = 3,
        max_len: int | None = None,
        block_trigrams: bool = True,
        length_penalty: float = 1.0,
    ) -> list[int]:
        """Beam search over `step`; a trigram already in a hypothesis may not be generated again in it."""
        memory = self.encode(features)
        max_len = max_len or self.max_len
        beams: list[tuple[list[int], float]] = [([Vocabulary.BOS], 0.0)]
        finished: list[tuple[list[int], float]] = []
        for _ in range(max_len):
            toks = torch.tensor([b[0] for b in beams], device=memory.device)
            logp = self._banned(self.step(toks, memory.expand(len(beams), -1, -1)).log_softmax(-1))
            if block_trigrams:
                for i, (seq, _) in enumerate(beams):
                    if len(seq) >= 3:
                        last = tuple(seq[-2:])
                        for j in range(len(seq) - 2):
                            if (seq[j], seq[j + 1]) == last:
                                logp[i, seq[j + 2]] = float("-inf")
            scores = logp + torch.tensor([b[1] for b in beams], device=logp.device).unsqueeze(1)
            top = scores.flatten().topk(min(2 * beam, scores.numel()))
            new_beams = []
            vocab = logp.shape[1]
            for val, idx in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                if val == float("-inf"):
                    continue
                b, tok = divmod(idx, vocab)
                seq = beams[b][0] + [tok]
                if tok == Vocabulary.EOS:
                    finished.append((seq, val))
                else:
                    new_beams.append((seq, val))
                if len(new_beams) == beam:
                    break
            beams = new_beams
            if not beams:
                break
            best_done = max((self._norm(s, v, length_penalty) for s, v in finished), default=float("-inf"))
            if len(finished) >= beam and best_done >= max(self._norm(s, v, length_penalty) for s, v in beams):
                break
        pool = finished or beams
        seq, _ = max(pool, key=lambda sv: self._norm(sv[0], sv[1], length_penalty))
        return [t for t in seq[1:] if t != Vocabulary.EOS]

    @staticmethod
    def _norm(seq: list[int], score: float, alpha: float) -> float:
        return score / max(len(seq) - 1, 1) ** alpha


class ReportGenerator(ReportModel):
    """`report.arch: resampler`: learned-query resampler + mean token -> small transformer encoder ->
    `nn.TransformerDecoder`. Its memory has a fixed size (`n_memory + 1` rows), so it is never padded."""

    arch = "resampler"

    def __init__(
        self,
        n_features: int,
        vocab_size: int,
        d_model: int = 512,
        n_memory: int = 64,
        encoder_layers: int = 1,
        decoder_layers: int = 3,
        heads: int = 8,
        d_ff: int = 512,
        dropout: float = 0.1,
        max_len: int = 100,
    ) -> None:
        super().__init__()
        self.config = {
            "arch": "resampler",
            "n_features": n_features,
            "vocab_size": vocab_size,
            "d_model": d_model,
            "n_memory": n_memory,
            "encoder_layers": encoder_layers,
            "decoder_layers": decoder_layers,
            "heads": heads,
            "d_ff": d_ff,
            "dropout": dropout,
            "max_len": max_len,
        }
        self.max_len = max_len
        self.encoder_module = ReportEncoder(n_features, d_model, n_memory, encoder_layers, heads, d_ff, dropout)
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=Vocabulary.PAD)
        self.pos = nn.Embedding(max_len + 2, d_model)
        layer = nn.TransformerDecoderLayer(d_model, heads, d_ff, dropout, batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, decoder_layers)
        self.out_norm = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, vocab_size)

    def encode_masked(
        self, features: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.encoder_module(features, padding_mask), None

    def decode(
        self, tokens: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        t = tokens.shape[1]
        pos = torch.arange(t, device=tokens.device).unsqueeze(0)
        x = self.embed(tokens) + self.pos(pos)
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool, device=tokens.device), diagonal=1)
        pad = tokens == Vocabulary.PAD
        h = self.decoder(x, memory, tgt_mask=causal, tgt_key_padding_mask=pad if pad.any() else None)
        return self.out(self.out_norm(h))

    def export_step(self, tokens: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """`step` for unpadded prefixes (greedy/beam decoding never pads), without `decode`'s data-dependent
        `if pad.any()` branch, which would not export."""
        t = tokens.shape[1]
        pos = torch.arange(t, device=tokens.device).unsqueeze(0)
        x = self.embed(tokens) + self.pos(pos)
        causal = torch.triu(torch.full((t, t), float("-inf"), device=tokens.device), diagonal=1)
        h = self.decoder(x, memory, tgt_mask=causal, tgt_is_causal=True)  # no data-dependent mask check
        return self.out(self.out_norm(h[:, -1:]))[:, 0]
