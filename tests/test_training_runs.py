"""`training.runs`: the step logs cut back to a resumed checkpoint, and the resume config check."""

from __future__ import annotations

import pytest

from service.errors import InvalidParameterError
from training.runs import check_resume_config, trim_logs


def test_logs_are_cut_back_to_the_checkpoint_step_including_a_row_cut_short_by_the_kill(tmp_path):
    (tmp_path / "metrics.csv").write_text("step,epoch,loss\n1,0,0.9\n2,0,0.8\n3,1,0.7\n4,1,0.")
    (tmp_path / "val_metrics.jsonl").write_text('{"epoch": 1, "step": 2}\n{"epoch": 2, "step": 4}\n{"epoch": 3, "st')
    (tmp_path / "other.csv").write_text("name,value\na,1\n")  # no step column: left alone
    trim_logs(tmp_path, 2, ("metrics.csv", "val_metrics.jsonl", "other.csv", "absent.csv"))
    assert (tmp_path / "metrics.csv").read_text().splitlines() == ["step,epoch,loss", "1,0,0.9", "2,0,0.8"]
    assert (tmp_path / "val_metrics.jsonl").read_text() == '{"epoch": 1, "step": 2}\n'
    assert (tmp_path / "other.csv").read_text() == "name,value\na,1\n"
    before = (tmp_path / "metrics.csv").stat().st_mtime_ns
    trim_logs(tmp_path, 2, ("metrics.csv",))  # nothing past the step: the file is not rewritten
    assert (tmp_path / "metrics.csv").stat().st_mtime_ns == before
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_resume_config_check_names_what_changed_and_lets_free_fields_change(tmp_path):
    saved = {"optim": {"lr": 1e-4, "betas": [0.9, 0.98]}, "data": {"num_workers": 2, "cohort": "/a"}, "out_dir": "/x"}
    ckpt = tmp_path / "last.pt"
    same_but_free = {"optim": {"lr": 1e-4, "betas": [0.9, 0.98]}, "data": {"num_workers": 0, "cohort": "/a"}}
    check_resume_config(saved, {**same_but_free, "out_dir": "/y"}, ("out_dir", "data.num_workers"), ckpt)
    check_resume_config(None, same_but_free, (), ckpt)  # a checkpoint that records no config
    check_resume_config(saved, {**same_but_free, "new_field": 1}, ("data",), ckpt)  # a field only one side has
    changed = {"optim": {"lr": 1e-3, "betas": [0.9, 0.99]}, "data": {"num_workers": 2, "cohort": "/b"}}
    with pytest.raises(InvalidParameterError) as err:
        check_resume_config(saved, changed, ("out_dir",), ckpt)
    message = str(err.value)
    assert "data.cohort: '/a' -> '/b'" in message and "optim.betas: [0.9, 0.98] -> [0.9, 0.99]" in message
    assert "optim.lr: 0.0001 -> 0.001" in message and "num_workers" not in message and str(ckpt) in message
