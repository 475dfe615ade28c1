"""Discrete-time survival for MIL heads, as in mSTAR's survival code (§3.2; Zadeh & Schmid 2020).

Times are cut into quantile bins of the *uncensored* training times; the head predicts one hazard per bin;
the loss is the censoring-aware negative log-likelihood (alpha = 0); risk = -Σ S(t). C-index is
scikit-survival's `concordance_index_censored`, with a percentile bootstrap CI. `marginal_hazards` and
`init_hazard_layer` start a head at the training population's hazards (a documented deviation from the official
random init, see docs/downstream.md).
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


def marginal_hazards(bins: np.ndarray, events: np.ndarray, n_bins: int, clip: float = 1e-3) -> np.ndarray:
    """The one hazard per bin that minimises the NLL loss over a population (the discrete life-table estimate):
    events in bin k / cases still at risk at its start (`bin >= k`; a case censored in bin k counts as having
    survived it, as in `nll_survival_loss`). Clipped to [clip, 1 - clip] so its logit is finite."""
    bins, events = np.asarray(bins, dtype=np.int64), np.asarray(events).astype(bool)
    at_risk = np.array([(bins >= k).sum() for k in range(n_bins)], dtype=float)
    died = np.array([(events & (bins == k)).sum() for k in range(n_bins)], dtype=float)
    return np.clip(died / np.maximum(at_risk, 1.0), clip, 1.0 - clip)


@torch.no_grad()
def init_hazard_layer(layer: torch.nn.Linear, hazards: np.ndarray) -> None:
    """Start a survival head at the population's marginal hazards: zero weights, bias = logit(hazards).

    With the official random init an aggregator whose embedding has a large shared component (a pretrained
    Stage-1 TransMIL: logits ≈ +1.5 for every slide) starts far from calibrated, and the first epochs go to
    undoing that rather than to ranking; selection could then keep such an epoch. From here the untrained head is
    the Kaplan-Meier-like null (the same curve for everybody) and training only adds what the slide explains."""
    hazards = torch.as_tensor(np.asarray(hazards, dtype=np.float64))
    if layer.out_features != hazards.numel() or layer.bias is None:
        raise InvalidParameterError(f"hazard layer has {layer.out_features} outputs, {hazards.numel()} hazards given")
    layer.weight.zero_()
    layer.bias.copy_(torch.logit(hazards).to(layer.bias.dtype))


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


# ---- calibration and Brier score (for `mstar eval`) ------------------------------------------------
# The discrete-time head gives S at the end of each bin: survival[:, k] = P(T > edges[k + 1]). Between edges
# the model says nothing finer, so everything below is evaluated at the *inner* bin edges, where the predicted
# survival is exactly defined (the outer edges lie at or beyond the follow-up range).


def survival_at_inner_edges(survival: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(times `[n_bins - 1]`, predicted S at those times `[B, n_bins - 1]`)."""
    survival, edges = np.asarray(survival, float), np.asarray(edges, float)
    if survival.ndim != 2 or survival.shape[1] != len(edges) - 1:
        raise InvalidParameterError(f"survival {survival.shape} does not match {len(edges)} bin edges")
    return edges[1:-1], survival[:, :-1]


def choose_horizon(edges: np.ndarray, times: np.ndarray) -> float | None:
    """The inner bin edge nearest to the median observed time (None with a single bin): the calibration plot's
    horizon. The median follow-up keeps about half the cohort under observation, and a bin edge is where the
    head's survival needs no interpolation."""
    inner = np.asarray(edges, float)[1:-1]
    if inner.size == 0:
        return None
    return float(inner[np.argmin(np.abs(inner - np.median(np.asarray(times, float))))])


def _surv(events: np.ndarray, times: np.ndarray) -> np.ndarray:
    from sksurv.util import Surv

    return Surv.from_arrays(np.asarray(events).astype(bool), np.asarray(times, float))


def brier_summary(
    ref_times: np.ndarray,
    ref_events: np.ndarray,
    times: np.ndarray,
    events: np.ndarray,
    survival: np.ndarray,
    edges: np.ndarray,
) -> dict:
    """Time-dependent Brier score (IPCW, scikit-survival) of the predicted survival at the inner bin edges inside
    the test follow-up, the integrated Brier score over them, and the same for the Kaplan-Meier null model (one
    survival curve for everybody, fitted on the reference set). `ref_*` (normally the training split) estimate
    the censoring distribution and the null model. Lower is better; a useful model beats the null."""
    from sksurv.metrics import brier_score, integrated_brier_score
    from sksurv.nonparametric import SurvivalFunctionEstimator

    times, events = np.asarray(times, float), np.asarray(events).astype(bool)
    grid, pred = survival_at_inner_edges(survival, edges)
    keep = (grid >= times.min()) & (grid < times.max()) & (grid < np.asarray(ref_times, float).max())
    grid, pred = grid[keep], pred[:, keep]
    out: dict = {"times": grid.tolist(), "brier": [], "null_brier": [], "ibs": None, "null_ibs": None}
    if grid.size == 0:
        out["note"] = "no inner bin edge inside the test follow-up"
        return out
    ref, test = _surv(ref_events, ref_times), _surv(events, times)
    null = SurvivalFunctionEstimator().fit(ref).predict_proba(grid)
    null_pred = np.broadcast_to(null, pred.shape)
    try:
        out["brier"] = brier_score(ref, test, pred, grid)[1].tolist()
        out["null_brier"] = brier_score(ref, test, null_pred, grid)[1].tolist()
        if grid.size >= 2:
            out["ibs"] = float(integrated_brier_score(ref, test, pred, grid))
            out["null_ibs"] = float(integrated_brier_score(ref, test, null_pred, grid))
    except ValueError as err:  # e.g. the censoring distribution reaches zero before a grid time
        out["note"] = f"Brier score not computable: {err}"
    return out


def km_calibration(
    times: np.ndarray, events: np.ndarray, predicted: np.ndarray, horizon: float, n_groups: int = 4
) -> dict:
    """Predicted vs observed survival at `horizon` in `n_groups` equal-sized groups of predicted S(horizon)
    (i.e. predicted-risk quantiles). Observed = Kaplan-Meier at the horizon with its 95% log-log CI
    (scikit-survival); NaN where a group's follow-up ends before the horizon. Also the group-size-weighted
    mean |predicted - observed|."""
    from sksurv.nonparametric import SurvivalFunctionEstimator

    times, events, predicted = np.asarray(times, float), np.asarray(events).astype(bool), np.asarray(predicted)
    n_groups = max(1, min(n_groups, len(times)))
    groups = []
    for idx in np.array_split(np.argsort(predicted, kind="stable"), n_groups):
        g = {"n": len(idx), "events": int(events[idx].sum()), "predicted": float(predicted[idx].mean())}
        g["observed"] = g["ci_low"] = g["ci_high"] = float("nan")
        if times[idx].max() >= horizon:
            est = SurvivalFunctionEstimator(conf_type="log-log").fit(_surv(events[idx], times[idx]))
            s, ci = est.predict_proba(np.array([horizon]), return_conf_int=True)
            g.update(observed=float(s[0]), ci_low=float(ci[0, 0]), ci_high=float(ci[1, 0]))
        groups.append(g)
    ok = [g for g in groups if np.isfinite(g["observed"])]
    err = sum(g["n"] * abs(g["predicted"] - g["observed"]) for g in ok) / max(sum(g["n"] for g in ok), 1)
    return {"horizon": float(horizon), "groups": groups, "mean_abs_error": float(err) if ok else float("nan")}
