"""Zero-shot slide classification with a Stage-1 model (§3.4).

Class embeddings: every template × synonym prompt goes through the text encoder + `proj_text`, is
L2-normalised, averaged per class and renormalised (CONCH/MI-Zero recipe) -> a classifier W `[C, E]`.

Two ways to score a slide, compared side by side:
- **MI-Zero, patch level** (the official method): patch embeddings in the shared space, cosine logits
  against W, mean of the top-k patch logits per class, k ∈ `topk`. The official patch embeddings are
  `proj(mSTAR(patch))` from the Stage-2 extractor; with `patch_proj` (a checkpoint holding
  `proj.weight/bias`) we use exactly that. Without Stage 2 we use the Stage-1 aggregator's per-patch output
  tokens — the very targets Stage 2 distils `proj(student)` towards — so the method runs on a Stage-1
  checkpoint alone.
- **Slide level**: the aggregator's slide embedding (normed CLS) against W.

Probabilities = softmax(14.29 · cosine), the official fixed CLIP scale. The k reported as "selected" is
chosen on the validation split; test is scored for every method. Pooling, logits and probabilities are the
bundle contract's `ZeroShotSpec` (`service.inference.bundle`), the very code the service scores prompts with, so
a served slide gets the probabilities evaluated here; the run records the spec it selected under `zeroshot`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from service.errors import InvalidParameterError
from service.inference.bundle import OFFICIAL_ZEROSHOT_SCALE, ZeroShotSpec, mi_zero_logits, slide_logits
from training.checkpoints import load_patch_proj, load_stage1
from training.cohort import FeatureStore, by_split, load_cohort
from training.downstream.common import finish_run
from training.downstream.config import DownstreamConfig
from training.metrics import classification_metrics

log = logging.getLogger(__name__)

LOGIT_SCALE = OFFICIAL_ZEROSHOT_SCALE  # exp(log(1/0.07)), the scale the official zero-shot code applies


@dataclass
class PromptSet:
    templates: list[str]
    classes: dict[str, list[str]]

    def texts(self, label: str) -> list[str]:
        return [t.replace("CLASSNAME", syn) for syn in self.classes[label] for t in self.templates]

    def to_dict(self) -> dict:
        return {"templates": self.templates, "classes": self.classes}


def load_prompts(path: str | Path, prompt_set: str = "0") -> PromptSet:
    """Read `{templates: [...CLASSNAME...], classes: {label: [synonyms]}}` and check it.

    The official files (`*_prompts_all_per_class.json`, CONCH style) load as they are: numbered prompt sets
    `{"0": {"classnames": {label: [synonyms]}, "templates": [...]}}`; `prompt_set` picks one (default "0",
    the set the official zero-shot code reads)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidParameterError(f"prompt file {path} does not exist")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InvalidParameterError(f"prompt file {path} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise InvalidParameterError(f"prompt file {path} must hold a JSON object")
    if "templates" not in raw and all(isinstance(v, dict) and "classnames" in v for v in raw.values()) and raw:
        if prompt_set not in raw:
            raise InvalidParameterError(f"{path}: no prompt set {prompt_set!r} (has {sorted(raw)})")
        raw = {"templates": raw[prompt_set].get("templates"), "classes": raw[prompt_set]["classnames"]}
    templates, classes = raw.get("templates"), raw.get("classes")
    if not isinstance(templates, list) or not templates or not all(isinstance(t, str) for t in templates):
        raise InvalidParameterError(f"{path}: 'templates' must be a non-empty list of strings")
    bad = [t for t in templates if "CLASSNAME" not in t]
    if bad:
        raise InvalidParameterError(f"{path}: templates without the CLASSNAME placeholder: {bad[:3]}")
    if not isinstance(classes, dict) or not classes:
        raise InvalidParameterError(f"{path}: 'classes' must map each label to a list of synonyms")
    for label, syns in classes.items():
        if not isinstance(syns, list) or not syns or not all(isinstance(s, str) and s for s in syns):
            raise InvalidParameterError(f"{path}: class {label!r} needs a non-empty list of synonyms")
    return PromptSet(list(templates), {str(k): list(v) for k, v in classes.items()})


def default_prompts_path() -> Path:
    return Path(__file__).parents[1] / "prompts" / "synthetic_cohort.json"


@torch.no_grad()
def class_embeddings(
    encode: Callable[[list[str]], torch.Tensor], prompts: PromptSet, labels: Sequence[str]
) -> torch.Tensor:
    """Classifier `[C, E]`: per class, the renormalised mean of the normalised prompt embeddings."""
    rows = []
    for label in labels:
        if label not in prompts.classes:
            raise InvalidParameterError(f"no prompts for class {label!r}")
        emb = F.normalize(encode(prompts.texts(label)).float(), dim=-1)
        rows.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(rows)


def mi_zero_scores(patch_emb: torch.Tensor, classifier: torch.Tensor, topk: Sequence[int]) -> dict[int, torch.Tensor]:
    """MI-Zero top-k pooling: for each k, the mean of the k highest patch cosine logits per class `[C]`."""
    p, c = patch_emb.detach().float().cpu().numpy(), classifier.detach().float().cpu().numpy()
    return {k: torch.from_numpy(mi_zero_logits(p, c, k)).float() for k in topk}


def slide_scores(slide_emb: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """Cosine logits `[C]` of one slide embedding."""
    return torch.from_numpy(
        slide_logits(slide_emb.detach().float().cpu().numpy(), classifier.detach().cpu().numpy())
    ).float()


def patch_embeddings(out: Any, feats: torch.Tensor, patch_proj: nn.Module | None) -> torch.Tensor:
    """A slide's patch embeddings in the shared text space `[N, E]` (not normalised): `proj(features)` with a
    Stage-2 `proj`, else the Stage-1 aggregator's output tokens (`out` = its forward on this slide)."""
    return patch_proj(feats) if patch_proj is not None else out.tokens[0]


def patch_embedding_name(patch_proj: nn.Module | None) -> str:
    return "stage2_proj" if patch_proj is not None else "stage1_aggregator_tokens"


def class_similarity(classifier: torch.Tensor, labels: Sequence[str]) -> dict:
    """The most similar pair of class embeddings. Near 1 means the prompts do not tell the classes apart *for
    this text encoder* (e.g. prompt words its training text never used): zero-shot then sits near chance."""
    sim = (classifier @ classifier.T).fill_diagonal_(-2.0)
    i, j = divmod(int(sim.argmax()), sim.shape[1])
    return {"max_cosine": float(sim[i, j]), "pair": [labels[i], labels[j]]}


# ---- the task ------------------------------------------------------------------------------------
def run_zeroshot(cfg: DownstreamConfig) -> dict:
    if cfg.stage1_checkpoint is None:
        raise InvalidParameterError("zero-shot needs stage1_checkpoint (aggregator + text encoder)")
    prompts = load_prompts(cfg.prompts or default_prompts_path())
    enc = load_stage1(cfg.stage1_checkpoint)
    patch_proj = load_patch_proj(cfg.patch_proj) if cfg.patch_proj else None
    store = FeatureStore(cfg.features_dir)
    cases = load_cohort(cfg.cohort)
    present = {c.fields.get(cfg.label_column) for c in cases}
    labels = [lab for lab in prompts.classes if lab in present]
    if len(labels) < 2:
        raise InvalidParameterError(
            f"prompt classes {sorted(prompts.classes)} match fewer than two cohort labels {sorted(map(str, present))}"
        )
    classifier = class_embeddings(enc.encode_text, prompts, labels)
    similar = class_similarity(classifier, labels)
    if similar["max_cosine"] > 0.98:
        log.warning(
            "prompt class embeddings of %s and %s are nearly identical (cosine %.3f): the text encoder does not "
            "separate these prompts; use words its training reports use",
            *similar["pair"],
            similar["max_cosine"],
        )
    lab_idx = {lab: i for i, lab in enumerate(labels)}
    splits = by_split([c for c in cases if c.fields.get(cfg.label_column) in lab_idx])
    methods = ["slide_level"] + [f"mi_zero_top{k}" for k in cfg.topk]
    result: dict[str, Any] = {}
    preds: dict[str, Any] = {}
    for split in ("val", "test"):
        cs = splits[split]
        if not cs:
            continue
        scores: dict[str, list[np.ndarray]] = {m: [] for m in methods}
        with torch.no_grad():
            for c in cs:
                feats = store.case(c)
                out = enc.vision(feats.unsqueeze(0))
                scores["slide_level"].append(slide_scores(out.embedding[0], classifier).numpy())
                patches = patch_embeddings(out, feats, patch_proj)
                for k, s in mi_zero_scores(patches, classifier, cfg.topk).items():
                    scores[f"mi_zero_top{k}"].append(s.numpy())
        y = np.array([lab_idx[c.fields[cfg.label_column]] for c in cs])
        result[split] = {}
        preds[split] = {"case_ids": [c.case_id for c in cs], "y_true": y.tolist(), "methods": {}}
        for m in methods:
            logits = np.stack(scores[m])
            probs = ZeroShotSpec(logit_scale=LOGIT_SCALE).probabilities(logits)
            result[split][m] = classification_metrics(y, probs, n_boot=cfg.n_boot, seed=cfg.seed)
            preds[split]["methods"][m] = probs.tolist()
    if "test" not in result:
        raise InvalidParameterError("the cohort has no test cases with a prompted label")
    ref = result.get("val", result["test"])
    mi = [m for m in methods if m.startswith("mi_zero")]
    best_mi = max(mi, key=lambda m: ref[m]["balanced_accuracy"]["value"])
    result["selected_on_val"] = {"mi_zero": best_mi, "slide_level": "slide_level"}
    result["chance_accuracy"] = 1.0 / len(labels)
    result["patch_embedding"] = patch_embedding_name(patch_proj)
    result["class_similarity"] = similar
    preds["best"] = best_mi
    meta = {
        "labels": labels,
        "prompts": prompts.to_dict(),
        "logit_scale": LOGIT_SCALE,
        "topk": int(best_mi.removeprefix("mi_zero_top")),
        "zeroshot": ZeroShotSpec(
            method="mi_zero_topk", logit_scale=LOGIT_SCALE, topk=int(best_mi.removeprefix("mi_zero_top"))
        ).model_dump(),
        "text_model_dir": getattr(enc.text, "model_dir", None),
    }
    holder = nn.Module()
    holder.register_buffer("classifier", classifier)
    return finish_run(cfg, holder, meta, result, preds, [], -1)
