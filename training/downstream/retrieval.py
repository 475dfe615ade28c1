"""Retrieval on the test split (§3.7; no official code): Recall@K by cosine similarity.

- text→slide: each test report (text encoder + `proj_text`) queries the test slides (Stage-1 slide
  embeddings); the relevant item is the report's own case. A class-level variant counts any slide of the
  same label.
- slide→slide: each test slide queries the other test slides; relevant = same label. Computed for the
  Stage-1 embedding when a checkpoint is given and always for mean patch features (a baseline).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from service.errors import InvalidParameterError
from training.checkpoints import load_stage1
from training.cohort import FeatureStore, by_split, load_cohort, load_reports
from training.downstream.common import finish_run, slide_embeddings, stage1_vision
from training.downstream.config import DownstreamConfig
from training.metrics import recall_at_k


def slide_to_slide(emb: np.ndarray, labels: np.ndarray, ks: list[int]) -> dict[str, float]:
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    rel = labels[:, None] == labels[None, :]
    np.fill_diagonal(rel, False)
    return recall_at_k(sim, rel, ks)


def text_to_slide(text_emb: np.ndarray, slide_emb: np.ndarray, ks: list[int]) -> dict[str, float]:
    return recall_at_k(text_emb @ slide_emb.T, np.eye(len(text_emb), dtype=bool), ks)


def run_retrieval(cfg: DownstreamConfig) -> dict:
    store = FeatureStore(cfg.features_dir)
    test = by_split(load_cohort(cfg.cohort))["test"]
    if len(test) < 2:
        raise InvalidParameterError("retrieval needs at least two test cases")
    ks = list(cfg.recall_ks)
    labels = np.array([str(c.fields.get(cfg.label_column)) for c in test])
    result: dict[str, Any] = {"test": {"slide_to_slide": {}}, "n_test": len(test)}
    result["test"]["slide_to_slide"]["mean_patch_features"] = slide_to_slide(
        slide_embeddings(store, test, None), labels, ks
    )
    vision = stage1_vision(cfg)
    if vision is not None:
        s_emb = slide_embeddings(store, test, vision)
        result["test"]["slide_to_slide"]["stage1_slide_embedding"] = slide_to_slide(s_emb, labels, ks)
        reports = load_reports(cfg.reports) if cfg.reports else {}
        enc = load_stage1(cfg.stage1_checkpoint)
        keep = [i for i, c in enumerate(test) if reports.get(c.case_id)]
        if enc.text is not None and len(keep) >= 2:
            t_emb = F.normalize(enc.encode_text([reports[test[i].case_id] for i in keep]), dim=-1)
            t_emb = t_emb.numpy()
            sub = s_emb[keep]
            result["test"]["text_to_slide"] = text_to_slide(t_emb, sub, ks)
            rel = labels[keep][:, None] == labels[keep][None, :]
            result["test"]["text_to_slide_same_class"] = recall_at_k(t_emb @ sub.T, rel, ks)
            result["test"]["slide_to_text"] = text_to_slide(sub, t_emb, ks)
    return finish_run(cfg, torch.nn.Module(), {}, result, {"test": {}}, [], -1)
