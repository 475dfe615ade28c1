"""Wraps `fit_mil` where the downstream tasks call it, to check what one training run did: bag reads per epoch
and that the recorded validation score and loss of the kept epoch are those of the returned model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.cohort import FeatureStore


def spy_on_fit_mil(monkeypatch: pytest.MonkeyPatch, *modules) -> list[dict]:
    """Every `fit_mil` call made through `modules` appends {epochs, train, val, reads, kept, score, loss}: `reads`
    = bags read inside the call, `score` / `loss` = the validation score and mean loss recomputed from the
    returned model, `kept` = the history row of the epoch it kept."""
    import training.downstream.mil as mil

    calls: list[dict] = []
    reads = {"n": 0}
    real_case, real_fit = FeatureStore.case, mil.fit_mil

    def counting_case(self, case):
        reads["n"] += 1
        return real_case(self, case)

    def fit(cfg, model, store, train, loss_fn, score_outputs, val=None, select_on_loss=False, forward=None):
        before = reads["n"]
        model, history, best = real_fit(cfg, model, store, train, loss_fn, score_outputs, val, select_on_loss, forward)
        inside = reads["n"] - before
        outs = mil.predict(model, store, val or [], forward)
        with torch.no_grad():
            loss = float(np.mean([loss_fn(o, c).item() for o, c in zip(outs, val, strict=True)]))
        calls.append(
            {
                "epochs": cfg.epochs,
                "train": len(train),
                "val": len(val or []),
                "reads": inside,
                "kept": history[best],
                "score": score_outputs(outs),
                "loss": loss,
            }
        )
        return model, history, best

    monkeypatch.setattr(FeatureStore, "case", counting_case)
    for module in (mil, *modules):
        monkeypatch.setattr(module, "fit_mil", fit)
    return calls


def assert_one_validation_pass(calls: list[dict]) -> None:
    """Each epoch read every training bag and every validation bag once (the score and the loss share one
    pass), and the kept epoch's recorded score and loss are the returned model's."""
    assert calls
    for c in calls:
        assert c["reads"] == c["epochs"] * (c["train"] + c["val"]), c
        assert c["kept"]["val_loss"] == pytest.approx(c["loss"], rel=1e-6), c
        assert c["kept"]["val_score"] == pytest.approx(c["score"], rel=1e-6, nan_ok=True), c
