"""Discrete-time survival for MIL heads, as in mSTAR's survival code (§3.2; Zadeh & Schmid 2020).

Times are cut into quantile bins of the *uncensored* training times; the head predicts one hazard per bin;
the loss is the censoring-aware negative log-likelihood (alpha = 0); risk = -Σ S(t). C-index is
scikit-survival's `concordance_index_censored`, with a percentile bootstrap CI.
"""

from __future__ import annotations

import numpy as np
import torch
from sksurv.metrics import concordance_index_censored

from service.errors import InvalidParameterError


def quantile_bin_edges(times: np.ndarray, events: np.ndarray, n_bins: int = 4, eps: float = 1e-6) -> np.ndarray:
    """Bin edges `[n_bins + 1]` from quantiles of uncensored times; outer edges span all times
    (official qcut)."""
    times = np.asarray(times, dtype=float)
    events = np.asarray(events).astype(bool)
    if n_bins < 1:
        raise InvalidParameterError(f"n_bins must be >= 1, got {n_bins}")
    unc = times[events]
    if unc.size < n_bins:
        raise InvalidParameterError(
            f"need at least {n_bins} uncensored times to make {n_bins} survival bins, have {unc.size}"
        )
    edges = np.quantile(unc, np.linspace(0.0, 1.0, n_bins + 1))
    edges[0] = min(times.min(), edges[0]) - eps
    edges[-1] = max(times.max(), edges[-1]) + eps
    if np.any(np.diff(edges) <= 0):
        raise InvalidParameterError("survival bin edges are not increasing: too many tied event times for n_bins")
    return edges


def assign_bins(times: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin index of each time (left-closed bins), clipped to the valid range for times outside the edges."""
    idx = np.searchsorted(edges, np.asarray(times, dtype=float), side="right") - 1
    return np.clip(idx, 0, len(edges) - 2).astype(np.int64)


def hazards_and_survival(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid hazards per bin and the survival curve S_k = Π_{j≤k}(1 - h_j)."""
    hazards = torch.sigmoid(logits)
    return hazards, torch.cumprod(1.0 - hazards, dim=-1)


def risk_from_survival(survival: torch.Tensor) -> torch.Tensor:
    """Risk score = -Σ_k S_k (higher = earlier death)."""
    return -survival.sum(dim=-1)


def nll_survival_loss(
    hazards: torch.Tensor,
    survival: torch.Tensor,
    y: torch.Tensor,
    censored: torch.Tensor,
    alpha: float = 0.0,
    eps: float = 1e-7,
) -> torch.Tensor:
    """Discrete-time NLL. `y` [B] bin index, `censored` [B] 1 if censored (no event) else 0."""
    y = y.long().view(-1, 1)
    c = censored.float().view(-1, 1)
    s_pad = torch.cat([torch.ones_like(c), survival], dim=1)  # S(-1) = 1
    h_y = hazards.gather(1, y).clamp(min=eps)
    s_prev = s_pad.gather(1, y).clamp(min=eps)
    s_this = s_pad.gather(1, y + 1).clamp(min=eps)
    uncensored = -(1 - c) * (torch.log(s_prev) + torch.log(h_y))
    censored_term = -c * torch.log(s_this)
    neg_l = uncensored + censored_term
    return ((1 - alpha) * neg_l + alpha * uncensored).mean()


def c_index(events: np.ndarray, times: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C-index (scikit-survival)."""
    return float(
        concordance_index_censored(np.asarray(events).astype(bool), np.asarray(times, float), np.asarray(risk))[0]
    )


def bootstrap_c_index(
    events: np.ndarray, times: np.ndarray, risk: np.ndarray, n_boot: int = 1000, seed: int = 0
) -> dict[str, float]:
    """C-index with a percentile 95% bootstrap CI (resamples without any event are skipped)."""
    events, times, risk = np.asarray(events).astype(bool), np.asarray(times, float), np.asarray(risk, float)
    rng = np.random.default_rng(seed)
    vals = []
    n = len(times)
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        if not events[idx].any():
            continue
        try:
            vals.append(c_index(events[idx], times[idx], risk[idx]))
        except ValueError:  # no comparable pairs in this resample
            continue
    arr = np.asarray(vals) if vals else np.asarray([np.nan])
    return {
        "value": c_index(events, times, risk),
        "mean": float(np.nanmean(arr)),
        "std": float(np.nanstd(arr)),
        "ci_low": float(np.nanpercentile(arr, 2.5)),
        "ci_high": float(np.nanpercentile(arr, 97.5)),
        "n": int(n),
    }
