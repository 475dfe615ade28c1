"""End to end on a small feature-level synthetic cohort: train heads, save/load, few-shot, eval report, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from fit_spy import assert_one_validation_pass, spy_on_fit_mil

from service.errors import InvalidParameterError
from training.checkpoints import load_head
from training.cohort import FeatureStore, load_cohort
from training.downstream.cli import run
from training.downstream.config import DownstreamConfig
from training.downstream.synth import make_feature_cohort
from training.evaluate import evaluate_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    make_feature_cohort(root, n_cases=200, n_classes=3, dim=24, patches=(12, 30), signal=1.5, seed=3)
    return root


def _cfg(cohort, tmp_path, **kw) -> DownstreamConfig:
    raw = {
        "cohort": str(cohort / "cohort.csv"),
        "features_dir": str(cohort / "features"),
        "reports": str(cohort / "reports.jsonl"),
        "dim": 32,
        "n_boot": 50,
        "epochs": 4,
        "lr": 1e-3,
        **kw,
    }
    path = tmp_path / f"{kw['task']}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return DownstreamConfig.from_yaml(path, out_dir=str(tmp_path / "runs" / kw["task"]))


def test_classification_abmil_trains_saves_and_reloads(cohort, tmp_path) -> None:
    cfg = _cfg(cohort, tmp_path, task="classification")
    m = run(cfg)
    assert m["test"]["macro_auc"]["value"] > 0.85
    assert 0 <= m["best_epoch"] < 4 and len(m["history"]) == 4
    head, meta = load_head(cfg.out_dir / "head.pt")
    assert meta["labels"] == ["COAD", "HNSC", "LUSC"] and meta["mil"]["kind"] == "abmil"
    # the reloaded head reproduces the saved test predictions
    preds = json.loads((cfg.out_dir / "predictions.json").read_text())["test"]
    store = FeatureStore(cfg.features_dir)
    case = next(c for c in load_cohort(cfg.cohort) if c.case_id == preds["case_ids"][0])
    with torch.no_grad():
        p = head(store.case(case)).logits.softmax(-1)[0].numpy()
    assert np.allclose(p, preds["probs"][0], atol=1e-5)


def test_classification_transmil(cohort, tmp_path) -> None:
    cfg = _cfg(
        cohort,
        tmp_path,
        task="classification",
        aggregator="transmil",
        epochs=3,
        transmil={"heads": 2, "num_landmarks": 8},
    )
    m = run(cfg)
    assert m["test"]["macro_auc"]["value"] > 0.7
    head, meta = load_head(cfg.out_dir / "head.pt")
    assert meta["mil"]["num_landmarks"] == 8 and head.kind == "transmil"


def test_survival_head(cohort, tmp_path) -> None:
    cfg = _cfg(cohort, tmp_path, task="survival", epochs=6)
    m = run(cfg)
    assert m["test"]["c_index"]["value"] > 0.58
    _, meta = load_head(cfg.out_dir / "head.pt")
    edges = meta["bin_edges"]
    assert len(edges) == 5 and all(np.diff(edges) > 0)
    preds = json.loads((cfg.out_dir / "predictions.json").read_text())["test"]
    s = np.array(preds["survival"])
    assert s.shape[1] == 4 and np.all(np.diff(s, axis=1) <= 1e-7)


def test_report_fewshot_retrieval_and_eval(cohort, tmp_path) -> None:
    rep = {  # HistGen (the default arch) at test size
        "d_model": 32,
        "region_size": 8,
        "n_prototypes": 16,
        "cmm_size": 32,
        "topk": 8,
        "heads": 2,
        "d_ff": 64,
        "decoder_layers": 2,
        "min_freq": 1,
        "lr": 3e-3,
        "beam": 2,
        "meteor": False,
        "batch_size": 8,
        "schedule": "cosine",
        "val_every": 2,
    }
    m = run(_cfg(cohort, tmp_path, task="report", epochs=3, report=rep))
    # validated (and selectable) at every 2nd epoch and at the last only
    assert ["val_score" in h for h in m["history"]] == [False, True, True] and m["best_epoch"] in (1, 2)
    assert set(m["test"]) == {"generated", "retrieval_baseline"}
    # cosine anneals over the run's epochs (StepLR's per-epoch decay stalls a small cohort's decoder early)
    lrs = [h["lr"] for h in m["history"]]
    assert lrs[0] == pytest.approx(0.75 * 3e-3) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert 0.0 <= m["test"]["generated"]["BLEU_4"] <= 1.0
    ckpt = torch.load(tmp_path / "runs" / "report" / "head.pt", weights_only=False)
    assert ckpt["meta"]["vocabulary"]["itos"][:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert ckpt["meta"]["decoder"]["vocab_size"] == len(ckpt["meta"]["vocabulary"]["itos"])
    assert ckpt["config"]["arch"] == "histgen" and ckpt["config"]["region_size"] == 8

    fs = run(_cfg(cohort, tmp_path, task="fewshot", fewshot_repeats=3))
    curve = fs["test"]["mean_patch_features"]["prototype"]
    ks = sorted(curve, key=int)
    assert ks[0] == "1" and len(ks) >= 3
    assert curve[ks[-1]]["balanced_accuracy_mean"] > curve[ks[0]]["balanced_accuracy_mean"] - 0.05
    assert curve[ks[-1]]["balanced_accuracy_mean"] > 0.6

    rt = run(_cfg(cohort, tmp_path, task="retrieval"))
    assert set(rt["test"]["slide_to_slide"]["mean_patch_features"]) == {"R@1", "R@5", "R@10"}

    run(_cfg(cohort, tmp_path, task="classification", epochs=2))
    run(_cfg(cohort, tmp_path, task="survival", epochs=2))
    out = evaluate_run(tmp_path / "runs")
    assert set(out) == {"classification", "survival", "report", "fewshot", "retrieval"}
    report = (tmp_path / "runs" / "report.md").read_text().lower()
    for heading in ("classification", "survival", "report generation", "few-shot", "retrieval", "log-rank"):
        assert heading in report
    plots = {p.name for p in (tmp_path / "runs" / "plots").glob("*.png")}
    assert {
        "classification_roc.png",
        "classification_confusion.png",
        "classification_calibration.png",
        "survival_km.png",
        "report_examples.png",
        "fewshot_curve.png",
    } <= plots
    assert json.loads((tmp_path / "runs" / "metrics.json").read_text())["survival"]["test"]["logrank_p"] >= 0


def test_cli_and_errors(cohort, tmp_path, monkeypatch) -> None:
    from service.cli import main

    cfg_path = tmp_path / "configs" / "c.yaml"
    cfg_path.parent.mkdir()
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "task": "classification",
                "cohort": str(cohort / "cohort.csv"),
                "features_dir": str(cohort / "features"),
                "dim": 16,
                "n_boot": 20,
                "epochs": 1,
            }
        )
    )
    runner = CliRunner()
    monkeypatch.chdir(tmp_path)  # --out is relative to the shell's folder, not to the YAML's
    res = runner.invoke(main, ["train", "downstream", "--config", str(cfg_path), "--out", "cli"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["test"]["macro_auc"] >= 0
    res = runner.invoke(main, ["eval", str(tmp_path / "cli")])
    assert res.exit_code == 0 and (tmp_path / "cli" / "report.md").is_file()
    # a second run into a finished run's folder replaced the head and metrics its report was written from
    kept = {p.name: p.read_bytes() for p in (tmp_path / "cli").iterdir() if p.is_file()}
    res = runner.invoke(main, ["train", "downstream", "--config", str(cfg_path), "--out", "cli"])
    assert res.exit_code == 2 and "already holds a run (head.pt): replace it with --overwrite" in res.output
    assert {p.name: p.read_bytes() for p in (tmp_path / "cli").iterdir() if p.is_file()} == kept
    res = runner.invoke(main, ["train", "downstream", "--config", str(cfg_path), "--out", "cli", "--overwrite"])
    assert res.exit_code == 0, res.output
    # a bad config is one clear error line, not a traceback
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: classification\ncohort: nowhere.csv\nfeatures_dir: nowhere\nbogus: 1\n")
    res = runner.invoke(main, ["train", "downstream", "--config", str(bad)])
    assert res.exit_code == 2 and "invalid config" in res.output
    with pytest.raises(InvalidParameterError, match="does not exist"):
        run(DownstreamConfig(task="classification", cohort=tmp_path / "none.csv", features_dir=cohort))
    with pytest.raises(InvalidParameterError, match="no downstream task results"):
        evaluate_run((tmp_path / "empty").mkdir() or tmp_path / "empty")


@pytest.mark.parametrize("aggregator", ["abmil", "transmil"])
def test_same_seed_same_model(cohort, tmp_path, aggregator) -> None:
    """Two runs of one config (patch subsampling and dropout on, global RNGs disturbed in between) give identical
    weights, predictions and metrics, on two intra-op threads; another seed gives another model."""
    torch.set_num_threads(2)  # the module's fixture restores its count afterwards
    kw = {
        "task": "classification",
        "aggregator": aggregator,
        "epochs": 1,
        "max_patches": 16,
        "seed": 5,
        "dropout": 0.25,
        "transmil": {"heads": 2, "num_landmarks": 8},
    }
    runs = []
    for i, seed in enumerate([5, 5, 6]):
        torch.rand(7), np.random.rand(3)  # a different global RNG state before each run
        (tmp_path / str(i)).mkdir()
        cfg = _cfg(cohort, tmp_path / str(i), **{**kw, "seed": seed})
        m = run(cfg)
        head, _ = load_head(cfg.out_dir / "head.pt")
        runs.append((m, head.state_dict(), json.loads((cfg.out_dir / "predictions.json").read_text())["test"]))
    (m1, w1, p1), (m2, w2, p2), (_, w3, _) = runs
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert p1["probs"] == p2["probs"]
    assert m1["test"] == m2["test"] and m1["history"] == m2["history"]
    assert not all(torch.equal(w1[k], w3[k]) for k in w1)


@pytest.mark.parametrize("task", ["classification", "survival"])
def test_one_validation_pass_per_epoch_records_the_kept_model(cohort, tmp_path, monkeypatch, task) -> None:
    # fit_mil runs the validation bags once per epoch for both the score and the loss (part of the demo heads'
    # time); what it records for the kept epoch must be what the returned model scores
    import training.downstream.survival as survival

    calls = spy_on_fit_mil(monkeypatch, survival)
    run(_cfg(cohort, tmp_path, task=task, epochs=3))
    assert len(calls) == 1 and calls[0]["val"] > 0
    assert_one_validation_pass(calls)
