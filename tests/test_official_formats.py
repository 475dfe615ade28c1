"""Files written by the official mSTAR code load as they are: a downstream TransMIL (classifier `classifier`),
a Stage-1 checkpoint whose text tower is a masked-LM model (`text_encoder.cls.*` saved too), and the CONCH-style
zero-shot prompt files. Each is built here in the layout the official code writes, not through our savers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from service.errors import InvalidParameterError
from training.checkpoints import load_any_head, load_official_transmil, load_stage1
from training.downstream.zeroshot import load_prompts

# the official downstream TransMIL's parameters (models/TransMIL/network.py + util.py), input width F, C classes
_W = 512


def official_transmil_state(n_features: int, n_classes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple[int, ...]] = {
        "_fc1.0.weight": (_W, n_features),
        "_fc1.0.bias": (_W,),
        "pos_layer.proj.weight": (_W, 1, 7, 7),
        "pos_layer.proj.bias": (_W,),
        "pos_layer.proj1.weight": (_W, 1, 5, 5),
        "pos_layer.proj1.bias": (_W,),
        "pos_layer.proj2.weight": (_W, 1, 3, 3),
        "pos_layer.proj2.bias": (_W,),
        "cls_token": (1, 1, _W),
        "norm.weight": (_W,),
        "norm.bias": (_W,),
        "classifier.weight": (n_classes, _W),
        "classifier.bias": (n_classes,),
    }
    for layer in ("layer1", "layer2"):
        shapes.update(
            {
                f"{layer}.norm.weight": (_W,),
                f"{layer}.norm.bias": (_W,),
                f"{layer}.attn.to_qkv.weight": (3 * _W, _W),
                f"{layer}.attn.to_out.0.weight": (_W, _W),
                f"{layer}.attn.to_out.0.bias": (_W,),
                f"{layer}.attn.res_conv.weight": (8, 1, 33, 1),
            }
        )
    return {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}


@pytest.mark.parametrize("wrap", ["bare", "ddp"])
def test_official_transmil_checkpoint_loads_as_a_head(tmp_path: Path, wrap: str) -> None:
    state = official_transmil_state(48, 3)
    saved = state if wrap == "bare" else {"model_state_dict": {f"module.{k}": v for k, v in state.items()}}
    path = tmp_path / "transmil.pth"
    torch.save(saved, path)

    head, meta = load_any_head(path)
    assert head.config["n_features"] == 48 and head.config["n_outputs"] == 3 and meta["labels"] == ["0", "1", "2"]
    assert torch.equal(head.mil._fc2.weight, state["classifier.weight"])
    assert torch.equal(head.mil.layer2.attn.res_conv.weight, state["layer2.attn.res_conv.weight"])
    with torch.no_grad():
        a = head(torch.randn(1, 37, 48, generator=torch.Generator().manual_seed(1)))
    assert a.logits.shape[-1] == 3 and torch.isfinite(a.logits).all()

    _, meta2 = load_official_transmil(path, labels=["luad", "lusc", "normal"])
    assert meta2["labels"] == ["luad", "lusc", "normal"]
    with pytest.raises(InvalidParameterError, match="3 classes"):
        load_official_transmil(path, labels=["a", "b"])


def test_not_a_transmil_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.pth"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(InvalidParameterError, match="not an official TransMIL"):
        load_any_head(path)


def test_official_stage1_with_masked_lm_text_tower(tmp_path: Path) -> None:
    from transformers import AutoModelForMaskedLM

    from training.models.text_encoder import build_tiny_bert
    from training.models.transmil import TransMIL

    bert_dir = build_tiny_bert(
        tmp_path / "bert",
        ["benign lung tissue.", "lung adenocarcinoma."] * 4,
        vocab_size=60,
        hidden=32,
        layers=1,
        heads=2,
        max_length=32,
    )
    torch.manual_seed(0)
    mlm = AutoModelForMaskedLM.from_pretrained(str(bert_dir))  # the official Text_encoder's backbone class
    mlm_state = mlm.state_dict()
    assert any(k.startswith("cls.") for k in mlm_state)
    vision = TransMIL(n_features=1024)  # the official Stage-1 aggregator: no classifier
    proj = torch.nn.Linear(32, 512)
    state = {f"module.vision_encoder.{k}": v for k, v in vision.state_dict().items()}
    state |= {f"module.text_encoder.{k}": v for k, v in mlm_state.items()}
    state |= {f"module.proj_text.{k}": v for k, v in proj.state_dict().items()}
    path = tmp_path / "stage1.pth"
    torch.save({"model_state_dict": state, "epoch": 10}, path)

    enc = load_stage1(path, text_model_dir=bert_dir)
    assert enc.text is not None and enc.proj_text is not None
    want = mlm_state["bert.encoder.layer.0.attention.self.query.weight"]
    assert torch.equal(enc.text.bert.encoder.layer[0].attention.self.query.weight, want)
    assert torch.equal(enc.proj_text.weight, proj.weight)


def test_official_prompt_files_load(tmp_path: Path) -> None:
    official = {  # *_prompts_all_per_class.json: numbered prompt sets of class names and templates
        "0": {
            "classnames": {"tumor": ["metastatic cancer", "tumor"], "normal": ["non-metastatic", "normal"]},
            "templates": ["CLASSNAME.", "an H&E stained image of CLASSNAME."],
        },
        "1": {"classnames": {"tumor": ["tumour"], "normal": ["benign"]}, "templates": ["a photo of CLASSNAME."]},
    }
    path = tmp_path / "camelyon_prompts_all_per_class.json"
    path.write_text(json.dumps(official, indent=4))
    p = load_prompts(path)
    assert list(p.classes) == ["tumor", "normal"] and len(p.templates) == 2
    assert p.texts("tumor")[:2] == ["metastatic cancer.", "an H&E stained image of metastatic cancer."]
    assert load_prompts(path, prompt_set="1").texts("normal") == ["a photo of benign."]
    with pytest.raises(InvalidParameterError, match="no prompt set"):
        load_prompts(path, prompt_set="7")
    bad = {"0": {"classnames": {"tumor": ["x"]}, "templates": ["no placeholder"]}}
    path.write_text(json.dumps(bad))
    with pytest.raises(InvalidParameterError, match="CLASSNAME"):
        load_prompts(path)
