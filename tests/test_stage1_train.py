"""Stage-1 training: data sampling, batch composition, config validation, CLI run, resume mid-epoch."""

from __future__ import annotations

import csv
import json
from collections import Counter

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from stage1_fixtures import write_tiny_setup

from service.cli import main
from service.errors import InvalidParameterError
from training.config import Stage1Config, load_config
from training.data.features import cancer_type_batches, read_feature_rows, sample_indices
from training.stage1 import knn_accuracy, prepare_data, recall_at_k, train_stage1


def _losses(run_dir):
    with (run_dir / "metrics.csv").open() as fh:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(fh)}


def test_sample_indices_and_rows(tmp_path):
    rng = np.random.default_rng(0)
    idx = sample_indices(100, 30, rng)
    assert len(idx) == 30 and len(set(idx)) == 30 and (np.diff(idx) > 0).all()
    idx = sample_indices(10, 25, rng)
    assert len(idx) == 25 and set(idx) == set(range(10)) and (np.diff(idx) >= 0).all()
    data = np.arange(40, dtype=np.float32).reshape(10, 4)
    with h5py.File(tmp_path / "s.h5", "w") as fh:
        fh["features"] = data
    np.testing.assert_array_equal(read_feature_rows(tmp_path / "s.h5", idx), data[idx])
    with pytest.raises(InvalidParameterError):
        sample_indices(0, 4, rng)


def test_standardization_uses_train_statistics(tmp_path):
    config = write_tiny_setup(tmp_path, n_cases=16, **{"data.standardize": True})
    train_ds, val_ds, *_ = prepare_data(load_config(config))
    assert train_ds.feature_mean is not None and val_ds.feature_mean is train_ds.feature_mean
    feats = torch.cat([train_ds[i]["features"] for i in range(len(train_ds))])
    assert feats.mean(0).abs().max() < 0.3 and (feats.std(0) - 1).abs().max() < 0.3


def test_batches_have_positives_and_unique_patients():
    labels = [i % 5 for i in range(53)]
    epoch0 = cancer_type_batches(labels, 12, 3, seed=1, epoch=0)
    assert epoch0 and all(len(b) == 12 for b in epoch0)
    for b in epoch0:
        assert len(set(b)) == len(b)
        assert all(c % 3 == 0 for c in Counter(labels[i] for i in b).values())
    assert epoch0 == cancer_type_batches(labels, 12, 3, seed=1, epoch=0)
    assert epoch0 != cancer_type_batches(labels, 12, 3, seed=1, epoch=1)
    with pytest.raises(InvalidParameterError):
        cancer_type_batches(labels, 10, 3, seed=1, epoch=0)


def test_config_validation(tmp_path):
    path = write_tiny_setup(tmp_path, n_cases=8)
    cfg = load_config(path)
    assert isinstance(cfg, Stage1Config)
    assert cfg.data.reports == cfg.data.cohort.parent / "reports.jsonl"
    assert cfg.model.aggregator.dim == 32 and cfg.optim.betas == (0.9, 0.98)
    bad = tmp_path / "bad.yaml"
    bad.write_text(path.read_text().replace("per_class: 2", "per_class: 3"))
    with pytest.raises(InvalidParameterError, match="multiple of per_class"):
        load_config(bad)
    bad.write_text(path.read_text() + "surprise: 1\n")
    with pytest.raises(InvalidParameterError, match="surprise"):
        load_config(bad)
    with pytest.raises(InvalidParameterError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    toml = tmp_path / "c.toml"
    toml.write_text(f'seed = 5\n[data]\ncohort = "{cfg.data.cohort}"\nfeatures_dir = "{cfg.data.features_dir}"\n')
    assert load_config(toml).seed == 5


def test_retrieval_and_knn_metrics():
    e = torch.eye(4)
    assert recall_at_k(e, e, [1]) == {1: 1.0}
    assert recall_at_k(e, e[[1, 0, 2, 3]], [1, 2]) == {1: 0.5, 2: 1.0}
    ref = torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1.0], [0.1, 0.9]])
    assert (
        knn_accuracy(
            torch.tensor([[1.0, 0.05], [0.05, 1.0]]), torch.tensor([0, 1]), ref, torch.tensor([0, 0, 1, 1]), k=2
        )
        == 1.0
    )


def test_cli_run_logs_checkpoints_and_validates(tmp_path):
    config = write_tiny_setup(tmp_path, n_cases=32)
    result = CliRunner().invoke(main, ["train", "stage1", "--config", str(config), "--set", "optim.epochs=6"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    losses = _losses(run)
    steps = sorted(losses)
    assert len(steps) >= 12
    first, last = np.mean([losses[s] for s in steps[:3]]), np.mean([losses[s] for s in steps[-3:]])
    assert last < first, (first, last)
    val = [json.loads(line) for line in (run / "val_metrics.jsonl").read_text().splitlines()]
    assert [v["epoch"] for v in val] == list(range(1, 7))
    assert {"knn_acc", "slide2report_R@5", "report2slide_R@1", "slide2rna_R@10"} <= set(val[-1])
    ckpt = torch.load(run / "last.pt", weights_only=False)
    assert ckpt["step"] == steps[-1] and ckpt["epoch"] == 6
    assert {"model_state_dict", "optimizer", "scheduler", "config", "label_names", "genes"} <= set(ckpt)
    assert "vision_encoder.cls_token" in ckpt["model_state_dict"] and "logit_scale" in ckpt["model_state_dict"]


def test_resume_mid_epoch_gives_the_same_next_loss(tmp_path):
    config = write_tiny_setup(tmp_path, n_cases=24)
    full = load_config(config, overrides={"out_dir": str(tmp_path / "full"), "optim.epochs": 3})
    train_ds, *_ = prepare_data(full)
    per_epoch = len(cancer_type_batches(train_ds.labels, 8, 2, full.seed, 0))
    assert per_epoch >= 2  # so that stopping after per_epoch + 1 steps is mid-epoch
    stop = per_epoch + 1
    train_stage1(full)
    part = load_config(config, overrides={"out_dir": str(tmp_path / "part"), "optim.epochs": 3})
    train_stage1(part, stop_after=stop)
    ckpt = torch.load(tmp_path / "part" / "last.pt", weights_only=False)
    assert ckpt["step"] == stop and ckpt["step_in_epoch"] == 1
    train_stage1(part, resume=True)
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "part")
    assert sorted(a) == sorted(b)
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step
    final_a = torch.load(tmp_path / "full" / "last.pt", weights_only=False)["model_state_dict"]
    final_b = torch.load(tmp_path / "part" / "last.pt", weights_only=False)["model_state_dict"]
    for k in final_a:
        torch.testing.assert_close(final_b[k], final_a[k], msg=k)


def test_refusals_resume_without_checkpoint_and_too_few_patients(tmp_path):
    config = write_tiny_setup(tmp_path, n_cases=24)
    with pytest.raises(InvalidParameterError, match="no checkpoint"):
        train_stage1(load_config(config), resume=True)
    with pytest.raises(InvalidParameterError, match="cannot fill one batch"):
        train_stage1(load_config(config, overrides={"optim.batch_size": 64}))
    result = CliRunner().invoke(main, ["train", "stage1", "--config", str(config), "--set", "optim.batch_size=64"])
    # through `mstar`: one error line and exit status 2, no traceback
    assert result.exit_code == 2 and "cannot fill one batch" in result.output, result.output


def test_slides_only_cohort_trains_on_the_triplet_term(tmp_path):
    config = write_tiny_setup(tmp_path, n_cases=24)
    cfg = load_config(config, overrides={"optim.epochs": 1})
    cfg.data.reports.unlink()
    cfg.data.rna.unlink()
    result = train_stage1(cfg)
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert not any(k.startswith(("text_encoder.", "gene_encoder.")) for k in ckpt["model_state_dict"])
    losses = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert losses and all(r["slide_report"] == "" and r["triplet"] != "" for r in losses)
    assert "knn_acc" in result["metrics"] and "slide2report_R@5" not in result["metrics"]


def test_a_nan_in_the_features_stops_training_with_a_reason(tmp_path):
    """One training slide's features all NaN: every loss was NaN, the run exited 0 with R@k = 1.0 (a NaN match
    counted as ranked first). It now stops at the first non-finite loss, naming the step."""
    import h5py

    config = write_tiny_setup(tmp_path, n_cases=24)
    cfg = load_config(config, overrides={"out_dir": str(tmp_path / "run"), "optim.epochs": 1})
    import csv

    train = next(r["slide_id"] for r in csv.DictReader(cfg.data.cohort.open()) if r["split"] == "train")
    with h5py.File(cfg.data.features_dir / f"{train}.h5", "r+") as f:
        f["features"][...] = np.nan
    with pytest.raises(InvalidParameterError, match="non-finite loss at step"):
        train_stage1(cfg)


def test_a_run_into_a_folder_holding_one_is_refused_unless_resumed_or_overwritten(tmp_path):
    """A new run without --resume into an out_dir holding a run truncated its logs and replaced its checkpoint (a
    finished 40-epoch run lost); two runs into one out_dir at once interleaved their metrics. Both are refused,
    and nothing of the existing run changes; --overwrite replaces it on purpose."""
    import fcntl

    config = write_tiny_setup(tmp_path, n_cases=24)
    cfg = load_config(config, overrides={"out_dir": str(tmp_path / "run"), "optim.epochs": 1})
    train_stage1(cfg)
    run = tmp_path / "run"
    kept = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(InvalidParameterError, match="already holds a run"):
        train_stage1(cfg)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == kept
    with (run / ".run.lock").open("w") as other:  # another run holds the folder
        fcntl.flock(other, fcntl.LOCK_EX)
        with pytest.raises(InvalidParameterError, match="another run is writing"):
            train_stage1(cfg, overwrite=True)
    assert train_stage1(cfg, overwrite=True)["checkpoint"].endswith("last.pt")


def test_a_kill_after_the_last_checkpoint_resumes_without_repeating_logs_and_with_its_own_config(tmp_path):
    """A run killed after logging steps (and an epoch's validation) past its last checkpoint logged them again
    after --resume: two rows for one step in metrics.csv, two validations of one epoch. The logs are now cut back
    to the checkpoint's step, so the resumed run's logs equal an uninterrupted run's. A resume with a config that
    changes what is trained (here the learning rate) went on as a mixed run; it is refused naming the field, and
    what only changes how the run is run (threads) is allowed."""
    config = write_tiny_setup(tmp_path, n_cases=24)
    full = load_config(config, overrides={"out_dir": str(tmp_path / "full"), "optim.epochs": 3})
    train_ds, *_ = prepare_data(full)
    per_epoch = len(cancer_type_batches(train_ds.labels, 8, 2, full.seed, 0))
    train_stage1(full)
    part_dir = tmp_path / "part"
    part = load_config(config, overrides={"out_dir": str(part_dir), "optim.epochs": 3})
    train_stage1(part, stop_after=per_epoch)  # epoch 1 done and checkpointed
    epoch1 = (part_dir / "last.pt").read_bytes()
    train_stage1(part, resume=True, stop_after=2 * per_epoch)  # epoch 2 logged and validated ...
    (part_dir / "last.pt").write_bytes(epoch1)  # ... but killed before its checkpoint reached the disk
    logged = (part_dir / "metrics.csv").read_bytes()

    other_lr = load_config(config, overrides={"out_dir": str(part_dir), "optim.epochs": 3, "optim.lr": 3e-4})
    with pytest.raises(InvalidParameterError, match=r"config differs .*optim\.lr: 0\.001 -> 0\.0003"):
        train_stage1(other_lr, resume=True)
    assert (part_dir / "metrics.csv").read_bytes() == logged and (part_dir / "last.pt").read_bytes() == epoch1

    threads = load_config(config, overrides={"out_dir": str(part_dir), "optim.epochs": 3, "num_threads": 1})
    train_stage1(threads, resume=True)
    with (part_dir / "metrics.csv").open() as fh:
        steps = [int(r["step"]) for r in csv.DictReader(fh)]
    assert steps == list(range(1, 3 * per_epoch + 1))
    a, b = _losses(tmp_path / "full"), _losses(part_dir)
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step
    val = [json.loads(line) for line in (part_dir / "val_metrics.jsonl").read_text().splitlines()]
    assert [v["epoch"] for v in val] == [1, 2, 3]


def test_damaged_rna_and_feature_files_are_refused_in_one_line_before_training(tmp_path):
    """A text value in the RNA matrix and a truncated feature file ended Stage 1 in a traceback (the feature file
    only when a batch reached it). Each is now one error line naming the file (and line and case), exit 2, and
    every feature file is checked when the data is prepared."""
    config = write_tiny_setup(tmp_path, n_cases=16)
    cfg = load_config(config)
    rna = cfg.data.rna.read_text()
    lines = rna.splitlines()
    header, row = lines[0].split(","), lines[3].split(",")
    row[2] = "n/a"
    cfg.data.rna.write_text("\n".join([*lines[:3], ",".join(row), *lines[4:]]) + "\n")
    run = ["train", "stage1", "--config", str(config), "--set", "optim.epochs=1"]
    result = CliRunner().invoke(main, run)
    assert result.exit_code == 2, result.output
    assert f"line 4, case {header[2]}: expression value 'n/a' is not a finite number" in result.output
    cfg.data.rna.write_text(rna.replace(lines[3], ",".join(row[:-1])))  # a ragged row
    assert "fields where the header has" in CliRunner().invoke(main, run).output
    cfg.data.rna.write_text(rna)

    last = sorted(cfg.data.features_dir.glob("*.h5"))[-1]  # read last, after the first batches
    last.write_bytes(last.read_bytes()[:1000])
    result = CliRunner().invoke(main, run)
    assert result.exit_code == 2 and f"cannot read feature file {last}" in result.output, result.output
    assert "Traceback" not in result.output
