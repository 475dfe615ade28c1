"""Test pipelines for the distributed workers, driven by the slide's own bytes.

A test slide is a copy of a real slide with a trailer `MSTAR-TEST:<action>` appended (TIFF readers ignore
trailing bytes), so each copy is a distinct slide and the worker finds out what to do from the file it was
given, exactly as a decoder would meet a poisonous slide:

* `abort`: the process aborts (`os.abort()`, SIGABRT), as a crashing native decoder does;
* `hang`: blocks the soft-time-limit signal and sleeps, like a decoder stuck in C code (hard limit);
* `sleep`: loops forever in Python (the soft limit stops it);
* `slow=<s>`: sleeps `s` seconds in small steps (reporting progress) before the real work;
* anything else / no trailer / a folder: the real pipeline (`service.pipeline.run_analysis`, tiling only, no bundle).

With `MSTAR_TEST_RUNLOG` set, every completed run appends its scratch directory's name (`job-<id>-...`).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from service.pipeline import run_analysis

MARK = b"MSTAR-TEST:"


def make_slide(src: Path, dest: Path, action: str = "ok") -> Path:
    """A copy of `src` with a trailer; distinct `action`/`dest` names make distinct bytes."""
    dest.write_bytes(src.read_bytes() + MARK + f"{action}:{dest.name}".encode())
    return dest


def _action(path: Path) -> str:
    if path.is_dir():  # a DICOM series folder: no trailer, the real pipeline
        return ""
    with open(path, "rb") as fh:
        fh.seek(max(0, path.stat().st_size - 256))
        tail = fh.read()
    i = tail.rfind(MARK)
    return tail[i + len(MARK) :].decode(errors="replace").split(":")[0] if i >= 0 else ""


def marked(slide_path, out_dir, options, *, bundle_dir=None, progress=None, should_cancel=None, **_kw) -> dict:
    action = _action(Path(slide_path))
    if action == "abort":
        os.abort()
    if action == "hang":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})  # Celery's soft limit cannot interrupt us
        while True:
            time.sleep(3600)
    if action == "sleep":  # a hang in Python code: Celery's soft time limit interrupts it
        while True:
            time.sleep(0.2)
    if action.startswith("slow="):
        secs = float(action.split("=", 1)[1])
        steps = max(1, int(secs / 0.1))
        for i in range(steps):
            if progress:
                progress("wait", i / steps)
            time.sleep(secs / steps)
    result = run_analysis(slide_path, out_dir, options, bundle_dir=None, progress=progress, should_cancel=should_cancel)
    log = os.environ.get("MSTAR_TEST_RUNLOG")
    if log:  # one line per completed run (the scratch dir is named after the job): counts executions
        with open(log, "a") as fh:
            fh.write(Path(out_dir).name + "\n")
    return result
