"""Reproducible exports (docs/export.md): the same `export.pt` exported from two checkouts in different folders gives
byte-identical ONNX files and equal manifest checksums; the zero-shot method a zero-shot run selected on validation
reaches the manifest, and the served probabilities are that run's evaluated ones."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from service.errors import BundleError, InvalidParameterError

ROOT = Path(__file__).resolve().parents[1]
# run `mstar export` with the package of the given checkout, after checking that it is the one imported
DRIVER = (
    "import sys, training, service.cli; "
    "assert training.__file__.startswith(sys.argv[1]), training.__file__; "
    "service.cli.main(sys.argv[2:])"
)
PROMPTS = {  # one template and one name per class: a class embedding is then exactly one served prompt's
    "templates": ["an image of CLASSNAME."],
    "classes": {"LUSC": ["lung squamous carcinoma"], "COAD": ["colon adenocarcinoma"], "HNSC": ["head and neck"]},
}


def _stage1(tmp: Path, cohort: Path, n_features: int) -> Path:
    from training.checkpoints import stage1_record
    from training.models.mstar import MStar
    from training.models.text_encoder import TextEncoder, build_tiny_bert
    from training.models.transmil import TransMIL

    texts = [json.loads(line)["report"] for line in (cohort / "reports.jsonl").read_text().splitlines()]
    bert = build_tiny_bert(tmp / "bert", texts, vocab_size=200, hidden=32, layers=1, heads=2)
    torch.manual_seed(0)
    model = MStar(TransMIL(n_features=n_features, dim=32, heads=2, num_landmarks=8), TextEncoder(bert, 64), None)
    path = tmp / "stage1.pt"
    config = {"model": {"aggregator": {"num_landmarks": 8}, "text": {"max_length": 64}}}
    torch.save(
        {**stage1_record(model), "model_state_dict": model.state_dict(), "config": config, "text_model_dir": str(bert)},
        path,
    )
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A zero-shot run on a feature cohort, and an export.pt of a micro ViT + that Stage-1 model's towers."""
    from training.checkpoints import load_stage1
    from training.downstream.cli import run
    from training.downstream.config import DownstreamConfig
    from training.downstream.synth import make_feature_cohort
    from training.export.contract import save_export_checkpoint
    from training.models.patch_encoder import build_patch_encoder

    tmp = tmp_path_factory.mktemp("repro")
    cohort = tmp / "cohort"
    make_feature_cohort(cohort, n_cases=45, n_classes=3, dim=96, patches=(10, 20), seed=4)
    stage1 = _stage1(tmp, cohort, 96)
    prompts = tmp / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS))
    zs = tmp / "zs"
    run(
        DownstreamConfig(
            task="zeroshot",
            cohort=cohort / "cohort.csv",
            features_dir=cohort / "features",
            stage1_checkpoint=stage1,
            prompts=prompts,
            topk=[1, 5, 100],  # never the default 50: the selected k must come from the run
            n_boot=5,
            out_dir=zs,
        )
    )
    torch.manual_seed(1)
    encoder, _ = build_patch_encoder("vit_micro_112")
    enc = load_stage1(stage1, with_text=True)
    export_pt = save_export_checkpoint(
        tmp / "run" / "export.pt",
        encoder_name="vit_micro_112",
        encoder_state=encoder.state_dict(),
        aggregator=enc.vision.aggregator,
        text={"module": enc.text, "proj": enc.proj_text},
        provenance={"run_id": "repro", "git_commit": "0" * 40},
        name="repro",
    )
    return {"tmp": tmp, "cohort": cohort, "zs": zs, "run": export_pt.parent}


@pytest.fixture(scope="module")
def exports(runs: dict[str, Path]) -> tuple[Path, Path]:
    """`mstar export RUN --zeroshot-run ZS` from this checkout and from a copy of it elsewhere, in other working
    directories and into other output folders, at the same time (one process each)."""
    tmp = runs["tmp"]
    copy = tmp / "elsewhere" / "checkout"
    for pkg in ("service", "training"):
        shutil.copytree(ROOT / pkg, copy / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    outs = (tmp / "out-a", tmp / "b" / "nested" / "out")
    procs = []
    for checkout, out, cwd in ((ROOT, outs[0], tmp / "cwd-a"), (copy, outs[1], tmp / "elsewhere")):
        cwd.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1"}
        args = ["export", str(runs["run"]), "--out", str(out), "--zeroshot-run", str(runs["zs"])]
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", DRIVER, str(checkout), *args],
                cwd=cwd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    for p in procs:
        output, _ = p.communicate(timeout=900)
        assert p.returncode == 0, output
    return outs


def test_two_checkouts_export_identical_bytes(exports: tuple[Path, Path]) -> None:
    a, b = (json.loads((d / "bundle.json").read_text()) for d in exports)
    assert [m["name"] for m in a["models"]] == ["mstar_patch_encoder", "mstar_aggregator", "mstar_text_encoder"]
    assert a["models"] == b["models"]  # names, files, tensor specs and sha256
    assert {k: v for k, v in a.items() if k != "provenance"} == {k: v for k, v in b.items() if k != "provenance"}
    assert a["provenance"]["checkpoint"] == "export.pt" and a["provenance"]["checkpoint_sha256"]
    for m in a["models"]:
        data = [(d / m["file"]).read_bytes() for d in exports]
        assert data[0] == data[1], m["name"]
        for needle in (str(ROOT), "/work/", "site-packages", "pkg.torch", "stack_trace"):
            assert needle.encode() not in data[0], (m["name"], needle)
        model = onnx.load_from_string(data[0])
        assert not model.metadata_props and not model.graph.metadata_props
        assert model.producer_version == torch.__version__.split("+")[0]  # no wheel build label
        assert not any(n.metadata_props or n.doc_string for n in model.graph.node)
        assert not any(v.metadata_props for v in [*model.graph.value_info, *model.graph.input])


def test_selected_zeroshot_reaches_the_manifest_and_is_served(runs: dict[str, Path], exports) -> None:
    from service.inference import zeroshot
    from service.inference.bundle import load_bundle
    from service.inference.ort_backend import OrtBackend
    from training.cohort import FeatureStore, load_cohort

    saved = torch.load(runs["zs"] / "head.pt", weights_only=True)["meta"]
    chosen = saved["zeroshot"]
    assert chosen["method"] == "mi_zero_topk" and chosen["topk"] in (1, 5, 100)
    bundle = load_bundle(exports[0])
    spec = bundle.manifest.zeroshot
    assert spec.model_dump() == chosen and spec.topk != 50 and spec.logit_scale == pytest.approx(14.29, abs=0.01)
    assert "selected on validation by zs" in bundle.manifest.provenance.notes

    # the served probabilities for a test slide are the ones the zero-shot run evaluated for it
    preds = json.loads((runs["zs"] / "predictions.json").read_text())
    best = preds["best"]
    assert best == f"mi_zero_top{spec.topk}"
    labels = saved["labels"]
    prompts = [PROMPTS["templates"][0].replace("CLASSNAME", PROMPTS["classes"][lab][0]) for lab in labels]
    cases = {c.case_id: c for c in load_cohort(runs["cohort"] / "cohort.csv")}
    store = FeatureStore(runs["cohort"] / "features")
    backend = OrtBackend(bundle, device="cpu")
    for i, case_id in enumerate(preds["test"]["case_ids"][:4]):
        feats = store.case(cases[case_id]).numpy()
        served = zeroshot.score(bundle, backend, feats, None, prompts)
        assert served["topk"] == spec.topk
        got = np.array([p["probability"] for p in served["prompts"]])
        np.testing.assert_allclose(got, preds["test"]["methods"][best][i], atol=2e-4)


def test_zeroshot_sources_are_checked(runs: dict[str, Path], tmp_path: Path) -> None:
    from training.export.bundle import export_run
    from training.export.contract import load_export_checkpoint, save_export_checkpoint, zeroshot_from_run
    from training.models.patch_encoder import build_patch_encoder

    chosen = zeroshot_from_run(runs["zs"])
    # export.pt can carry it too (a run directory, its head.pt or a spec), and keeps it through load
    encoder, _ = build_patch_encoder("vit_micro_112")
    text = {"model_dir": "unused", "proj_state_dict": {}}
    path = save_export_checkpoint(
        tmp_path / "r" / "export.pt", encoder_name="vit_micro_112", text=text, zeroshot=runs["zs"] / "head.pt"
    )
    assert torch.load(path, weights_only=True)["zeroshot"] == chosen
    with pytest.raises(InvalidParameterError, match="no text encoder"):
        save_export_checkpoint(tmp_path / "x" / "export.pt", encoder_name="vit_micro_112", zeroshot=chosen)
    with pytest.raises(InvalidParameterError, match="invalid zero-shot method"):
        save_export_checkpoint(
            tmp_path / "y" / "export.pt", encoder_name="vit_micro_112", text=text, zeroshot={"topk": 0}
        )
    # a run that is not a zero-shot run, or no run at all, is refused with the reason
    other = tmp_path / "cls"
    other.mkdir()
    torch.save({"state_dict": {}, "meta": {"task": "classification"}}, other / "head.pt")
    with pytest.raises(InvalidParameterError, match="not from a zero-shot run"):
        zeroshot_from_run(other)
    with pytest.raises(InvalidParameterError, match=r"no head\.pt"):
        zeroshot_from_run(tmp_path)
    # a bundle without a text encoder cannot serve a zero-shot method
    plain = save_export_checkpoint(
        tmp_path / "plain" / "export.pt", encoder_name="vit_micro_112", encoder_state=encoder.state_dict()
    )
    assert load_export_checkpoint(plain).zeroshot is None
    with pytest.raises(BundleError, match="no text encoder"):
        export_run(plain.parent, tmp_path / "bundle", zeroshot_run=runs["zs"])
