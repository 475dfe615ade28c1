"""A run folder's life: held by one run at a time, resumed only with the config it was trained with, and its
logs cut back to the checkpoint it resumes from.

Stage 1, Stage 2 and the downstream heads write into an `out_dir`. Without these checks a new run without
`--resume` replaced a finished run's checkpoint and truncated its logs, two runs at once interleaved their rows,
a resume with another learning rate or batch size went on silently as a mixed run, and the steps logged between
the last checkpoint and a kill were logged again after the resume (two rows for one step in metrics.csv).
"""

from __future__ import annotations

import csv
import fcntl
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from service.atomic import atomic_path
from service.errors import InvalidParameterError


@contextmanager
def run_folder(
    out_dir: str | Path,
    *,
    resume: bool,
    overwrite: bool,
    marker: str,
    resumable: bool = True,
) -> Iterator[Path]:
    """`out_dir` held for one run: a second run into it at the same time is refused (a lock file), and so is a new
    run into a folder that already holds one (`marker`, e.g. `last.pt`) unless it resumes it or says `overwrite`.
    Other ranks than the main one (`RANK`, as torchrun sets it) only get the folder. `resumable` False: the command
    has no --resume (the refusal does not offer it)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if int(os.environ.get("RANK", "0")) != 0:
        yield out
        return
    lock = (out / ".run.lock").open("w")
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InvalidParameterError(
                f"another run is writing to {out}: wait for it, or choose another out_dir"
            ) from None
        if not resume and not overwrite and (out / marker).exists():
            ways = (
                "continue it with --resume, replace it with --overwrite" if resumable else "replace it with --overwrite"
            )
            raise InvalidParameterError(f"{out} already holds a run ({marker}): {ways}, or choose another out_dir")
        yield out
    finally:
        lock.close()


def resume_checkpoint(path: Path, config: dict[str, Any], free: Iterable[str], needs: Iterable[str], what: str) -> dict:
    """The checkpoint a `--resume` continues from: refused when missing, unreadable, not a training checkpoint of
    `what` (lacking a key of `needs`), or trained with a config that differs from `config` outside `free`."""
    import torch

    if not path.is_file():
        raise InvalidParameterError(f"--resume: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types on a truncated or foreign file
        raise InvalidParameterError(f"--resume: cannot read {path}: {err}") from err
    if not isinstance(ckpt, dict) or not set(needs) <= ckpt.keys():
        raise InvalidParameterError(f"--resume: {path} is not a {what} training checkpoint")
    check_resume_config(ckpt.get("config"), config, free, path)
    return ckpt


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def check_resume_config(saved: Any, current: dict[str, Any], free: Iterable[str], checkpoint: Path) -> None:
    """Refuse a resume whose config differs from the one the checkpoint was trained with, naming each field.

    `free` lists the dotted fields a resume may change because they do not change what is trained (where the run
    lives, threads, loader workers, logging). A field only one side has (a checkpoint written before the field
    existed, or after one was dropped) is not compared; a checkpoint that records no config is not checked."""
    if not isinstance(saved, dict):
        return
    was, now, skip = _flat(saved), _flat(current), set(free)
    changed = [
        f"{key}: {was[key]!r} -> {now[key]!r}"
        for key in sorted(was.keys() & now.keys())
        if key not in skip and not any(key.startswith(f"{f}.") for f in skip) and was[key] != now[key]
    ]
    if changed:
        shown = "; ".join(changed[:6]) + (f"; and {len(changed) - 6} more" if len(changed) > 6 else "")
        raise InvalidParameterError(
            f"--resume: the config differs from the one {checkpoint} was trained with ({shown}): resume with that "
            "config, or start a new run with --overwrite or another out_dir"
        )


def trim_logs(out_dir: Path, step: int, names: Iterable[str]) -> None:
    """Drop the rows of each step log (`*.csv` with a `step` column, `*.jsonl` with a `step` field) logged after
    `step`, the step of the checkpoint a run resumes from: those steps run again and are logged again."""
    for name in names:
        path = Path(out_dir) / name
        if not path.is_file():
            continue
        if path.suffix == ".csv":
            with path.open(newline="") as fh:
                rows = list(csv.reader(fh))
            if not rows or "step" not in rows[0]:
                continue
            col = rows[0].index("step")
            kept = [rows[0]] + [r for r in rows[1:] if len(r) > col and _step(r[col]) <= step]
            if len(kept) == len(rows):
                continue
            with atomic_path(path) as tmp, Path(tmp).open("w", newline="") as fh:
                csv.writer(fh).writerows(kept)
        else:
            lines = path.read_text().splitlines()
            kept_lines = [line for line in lines if line.strip() and _step(_json_step(line)) <= step]
            if len(kept_lines) == len(lines):
                continue
            with atomic_path(path) as tmp:
                Path(tmp).write_text("".join(f"{line}\n" for line in kept_lines))


def _json_step(line: str) -> Any:
    try:
        record = json.loads(line)
    except ValueError:
        return None  # a line cut short by the kill
    return record.get("step") if isinstance(record, dict) else None


def _step(value: Any) -> float:
    """A logged step as a number; a row cut short by the kill (no number) counts as after any checkpoint."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("inf")
