"""Zero-shot (prompts, class embeddings, MI-Zero top-k) and retrieval/few-shot with a Stage-1 checkpoint."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from service.errors import InvalidParameterError
from training.checkpoints import head_from_stage1, load_head, load_stage1, stage1_record
from training.downstream.cli import run
from training.downstream.config import DownstreamConfig
from training.downstream.synth import make_feature_cohort
from training.downstream.zeroshot import (
    class_embeddings,
    default_prompts_path,
    load_prompts,
    mi_zero_scores,
    slide_scores,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _bow(texts: list[str], dim: int = 64) -> torch.Tensor:
    """A real (if crude) text embedding: hashed bag of words."""
    out = torch.zeros(len(texts), dim)
    for i, t in enumerate(texts):
        for w in t.lower().replace(".", " ").split():
            out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % dim] += 1.0
    return out


def test_default_prompts_cover_synthetic_types() -> None:
    from training.data.synth_tissue import CANCER_TYPES

    p = load_prompts(default_prompts_path())
    assert set(CANCER_TYPES) <= set(p.classes)
    assert len(p.texts("LUSC")) == len(p.templates) * len(p.classes["LUSC"])
    assert all("CLASSNAME" not in t for t in p.texts("BRCA"))


@pytest.mark.parametrize(
    "content, match",
    [
        ("not json", "not valid JSON"),
        (json.dumps({"templates": ["no placeholder"], "classes": {"A": ["a"]}}), "CLASSNAME"),
        (json.dumps({"templates": ["CLASSNAME."], "classes": {}}), "classes"),
        (json.dumps({"templates": ["CLASSNAME."], "classes": {"A": []}}), "synonyms"),
    ],
)
def test_bad_prompt_files(tmp_path, content, match) -> None:
    path = tmp_path / "p.json"
    path.write_text(content)
    with pytest.raises(InvalidParameterError, match=match):
        load_prompts(path)


def test_class_embeddings_and_scoring(tmp_path) -> None:
    path = tmp_path / "p.json"
    path.write_text(
        json.dumps(
            {
                "templates": ["CLASSNAME.", "an image of CLASSNAME."],
                "classes": {"tumor": ["carcinoma", "tumor"], "normal": ["benign tissue"]},
            }
        )
    )
    prompts = load_prompts(path)
    w = class_embeddings(_bow, prompts, ["tumor", "normal"])
    assert w.shape == (2, 64) and torch.allclose(w.norm(dim=-1), torch.ones(2))
    # a slide whose few informative patches read "carcinoma" is called tumour by top-k pooling
    patches = torch.randn(50, 64) * 0.01
    patches[:3] += _bow(["carcinoma"]) * 5
    scores = mi_zero_scores(patches, w, [1, 3, 50])
    assert scores[1].argmax() == 0 and scores[3].argmax() == 0
    logits = torch.nn.functional.normalize(patches, dim=-1) @ w.T
    assert torch.allclose(scores[3], logits.topk(3, dim=0).values.mean(0))
    assert torch.allclose(scores[50], logits.mean(0))  # k = N is mean pooling
    assert slide_scores(_bow(["benign tissue"])[0], w).argmax() == 1
    with pytest.raises(InvalidParameterError):
        class_embeddings(_bow, prompts, ["unknown"])


def _stage1_checkpoint(tmp_path, cohort, n_features: int) -> str:
    from training.models.mstar import MStar
    from training.models.text_encoder import TextEncoder, build_tiny_bert
    from training.models.transmil import TransMIL

    texts = [json.loads(line)["report"] for line in (cohort / "reports.jsonl").read_text().splitlines()]
    bert_dir = build_tiny_bert(tmp_path / "bert", texts, vocab_size=200, hidden=32, layers=1, heads=2)
    torch.manual_seed(0)
    model = MStar(TransMIL(n_features=n_features, dim=32, heads=2, num_landmarks=8), TextEncoder(bert_dir, 64), None)
    path = tmp_path / "stage1.pt"
    torch.save(
        {
            **stage1_record(model),
            "model_state_dict": model.state_dict(),
            "config": {"model": {"aggregator": {"num_landmarks": 8}, "text": {"max_length": 64}}},
            "text_model_dir": str(bert_dir),
            "feature_mean": np.full(n_features, 0.1, np.float32),
            "feature_std": np.full(n_features, 2.0, np.float32),
        },
        path,
    )
    return str(path)


def test_zeroshot_retrieval_fewshot_and_pre_head_with_stage1(tmp_path) -> None:
    cohort = tmp_path / "cohort"
    make_feature_cohort(cohort, n_cases=60, n_classes=3, dim=16, patches=(10, 20), seed=1)
    ckpt = _stage1_checkpoint(tmp_path, cohort, 16)
    enc = load_stage1(ckpt)
    assert enc.encode_text(["lung carcinoma", "colon"]).shape == (2, 32)
    base = {
        "cohort": cohort / "cohort.csv",
        "features_dir": cohort / "features",
        "reports": cohort / "reports.jsonl",
        "stage1_checkpoint": ckpt,
        "n_boot": 20,
        "topk": [1, 5, 100],
    }

    zs = run(DownstreamConfig(task="zeroshot", out_dir=tmp_path / "zs", **base))
    assert set(zs["test"]) == {"slide_level", "mi_zero_top1", "mi_zero_top5", "mi_zero_top100"}
    assert zs["chance_accuracy"] == pytest.approx(1 / 3)
    assert zs["patch_embedding"] == "stage1_aggregator_tokens"
    saved = torch.load(tmp_path / "zs" / "head.pt", weights_only=False)
    assert saved["state_dict"]["classifier"].shape == (3, 32)
    assert saved["meta"]["labels"] == ["LUSC", "COAD", "HNSC"] and "templates" in saved["meta"]["prompts"]
    probs = np.array(json.loads((tmp_path / "zs" / "predictions.json").read_text())["test"]["methods"]["slide_level"])
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)

    rt = run(DownstreamConfig(task="retrieval", out_dir=tmp_path / "rt", **base))
    for key in ("text_to_slide", "slide_to_text", "text_to_slide_same_class"):
        assert set(rt["test"][key]) == {"R@1", "R@5", "R@10"}
    assert "stage1_slide_embedding" in rt["test"]["slide_to_slide"]

    assert zs["class_similarity"]["max_cosine"] <= 1.0 + 1e-6 and len(zs["class_similarity"]["pair"]) == 2

    fs = run(DownstreamConfig(task="fewshot", out_dir=tmp_path / "fs", fewshot_repeats=2, **base))
    assert set(fs["test"]) == {"mean_patch_features", "stage1_slide_embedding", "stage1_aggregator_tokens"}
    assert set(fs["test"]["stage1_aggregator_tokens"]) == {"patch_prototype"}
    pp = fs["patch_prototype"]
    assert pp["selected_on"] == "val" and pp["topj"] in (1, 5, 100) and pp["n_top_patches"] == 100
    assert set(fs["test"]["stage1_aggregator_tokens"]["patch_prototype"]) == {str(k) for k in fs["shots"]}
    only = run(
        DownstreamConfig(
            task="fewshot", out_dir=tmp_path / "fs2", fewshot_repeats=1, fewshot_methods=["patch_prototype"], **base
        )
    )
    assert set(only["test"]) == {"stage1_aggregator_tokens"}
    from training.evaluate import evaluate_run

    evaluate_run(tmp_path / "fs")
    report = (tmp_path / "fs" / "report.md").read_text()
    assert "| stage1_aggregator_tokens | patch_prototype |" in report and "MI-Zero top-" in report
    no_ckpt = {k: v for k, v in base.items() if k != "stage1_checkpoint"}
    with pytest.raises(InvalidParameterError, match="stage1_checkpoint"):
        run(DownstreamConfig(task="fewshot", out_dir=tmp_path / "fs3", fewshot_methods=["patch_prototype"], **no_ckpt))

    # TransMIL_Pre keeps the Stage-1 input standardisation, also through save / load
    cls = run(
        DownstreamConfig(
            task="classification",
            aggregator="transmil_pre",
            epochs=1,
            out_dir=tmp_path / "pre",
            **{k: v for k, v in base.items() if k != "topk"},
        )
    )
    assert cls["test"]["macro_auc"]["value"] >= 0
    head, _ = load_head(tmp_path / "pre" / "head.pt")
    assert torch.allclose(head.feature_std, torch.full((16,), 2.0))
    fresh = head_from_stage1(ckpt, 3)
    assert torch.allclose(fresh.feature_mean, torch.full((16,), 0.1))
