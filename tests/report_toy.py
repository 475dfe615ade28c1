"""The memorising toy both report-generator tests train (tests/test_downstream_heads.py for the resampler,
tests/test_report_histgen.py for HistGen): two classes of bags (6 features around two prototypes), one fixed report
each. A generator that learns at all maps each bag to its report within 150 steps; the tests assert that."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from training.models.report_decoder import Vocabulary, normalize

TEXTS = ("benign tissue without tumor .", "invasive carcinoma with necrosis , high grade .")
N_FEATURES = 6


@dataclass
class ToyReports:
    model: torch.nn.Module  # trained, in eval mode
    vocab: Vocabulary
    protos: torch.Tensor  # [2, N_FEATURES]: class c's bags are noise around protos[c]

    def bag(self, c: int, n: int = 10) -> torch.Tensor:
        """A fresh bag of class `c` ([n, N_FEATURES]) drawn from the global torch RNG."""
        return torch.randn(n, N_FEATURES) + self.protos[c]

    def expected(self, c: int) -> str:
        """Class `c`'s report as decoding must give it back."""
        return normalize(TEXTS[c])


def train_toy_reports(build: Callable[[int], torch.nn.Module], steps: int = 150, lr: float = 3e-3) -> ToyReports:
    """Seed 0, `build(vocab_size)` (its input is N_FEATURES wide), then teacher-forced cross-entropy on one bag of
    ten patches per step, alternating the two classes."""
    torch.manual_seed(0)
    vocab = Vocabulary.build(list(TEXTS), min_freq=1)
    model = build(len(vocab)).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    protos = torch.randn(2, N_FEATURES) * 2
    targets = [torch.tensor(vocab.encode(t)) for t in TEXTS]
    for step in range(steps):
        c = step % 2
        tok = targets[c].unsqueeze(0)
        logits = model(torch.randn(1, 10, N_FEATURES) + protos[c], tok[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits[0], tok[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ToyReports(model.eval(), vocab, protos)
