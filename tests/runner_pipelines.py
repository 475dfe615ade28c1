"""Small real pipelines with `run_analysis`'s signature, for runner/API tests that must not depend on models.

They really open the stored slide (`open_slide`), read pixels, write `result.json`, `features.h5` (CLAM layout)
and `heatmap.png`, report progress and honour cancel. Imported by name (`runner_pipelines:tiny`) inside the
spawned worker processes, which inherit the test process's `sys.path`.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from service.errors import CorruptSlideError
from service.pipeline import JobCanceled
from service.slides.mpp import require_mpp
from service.slides.open import open_slide


def tiny(slide_path: Path, out_dir: Path, options, *, bundle_dir=None, progress=None, should_cancel=None) -> dict:
    progress = progress or (lambda stage, frac: None)
    should_cancel = should_cancel or (lambda: False)
    progress("open", 0.0)
    with open_slide(slide_path, mpp_override=options.mpp_override) as reader:
        mpp = require_mpp(reader)
        thumb = reader.thumbnail(64)
        w, h = reader.dimensions
        progress("embed", 0.3)
        coords = np.array([[x, y] for y in range(0, h - 255, 256) for x in range(0, w - 255, 256)][:16], dtype=np.int64)
        feats = []
        for i, (x, y) in enumerate(coords):
            if should_cancel():
                raise JobCanceled("canceled")
            patch = reader.read_region((int(x), int(y)), 0, (256, 256))
            feats.append(patch.reshape(-1, 3).mean(0) / 255.0)
            progress("embed", 0.3 + 0.6 * (i + 1) / len(coords))
    feats = np.asarray(feats, dtype=np.float32)
    progress("write", 0.95)
    with h5py.File(out_dir / "features.h5", "w") as f:
        f.create_dataset("features", data=feats)
        f.create_dataset("coords", data=coords)
        f.attrs["patch_size"] = 256
    Image.fromarray(thumb).save(out_dir / "heatmap.png")
    result = {
        "embedding": feats.mean(0).tolist(),
        "n_patches": len(coords),
        "mpp": mpp.mean,
        "tasks": list(options.tasks),
        "worker_pid": os.getpid(),
    }
    (out_dir / "result.json").write_text(json.dumps(result))
    return result


def slow(slide_path: Path, out_dir: Path, options, *, bundle_dir=None, progress=None, should_cancel=None) -> dict:
    """Runs for up to 60 s in small steps, so tests can cancel it or kill the server under it."""
    progress("open", 0.0)
    with open_slide(slide_path, mpp_override=options.mpp_override) as reader:
        reader.read_region((0, 0), 0, (64, 64))
    for i in range(600):
        if should_cancel():
            raise JobCanceled("canceled")
        progress("embed", i / 600)
        time.sleep(0.1)
    return tiny(slide_path, out_dir, options, progress=progress, should_cancel=should_cancel)


def crash(slide_path: Path, out_dir: Path, options, **_kw) -> dict:
    """A decoder segfault, as far as the runner can tell: the worker process dies without a word."""
    os._exit(139)


def broken(slide_path: Path, out_dir: Path, options, **_kw) -> dict:
    raise RuntimeError("/secret/internal/path exploded")


def hang(slide_path: Path, out_dir: Path, options, *, progress=None, **_kw) -> dict:
    """A stage that never returns and never polls cancel, in Python code (the soft time limit reaches it),
    inside a reader that turns every error into `corrupt_slide` (the runner must still say `time_limit`)."""
    progress("open", 0.0)
    try:
        while True:
            time.sleep(0.05)
    except Exception as exc:
        raise CorruptSlideError("the slide's pixels could not be decoded") from exc


def stuck(slide_path: Path, out_dir: Path, options, *, progress=None, **_kw) -> dict:
    """Stuck where no Python runs (a decoder blocked in C), as far as the runner can tell: the soft limit's
    signal is ignored and cancel is never polled, so only killing the worker ends it."""
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    progress("open", 0.0)
    while True:
        time.sleep(0.05)


BEHAVIOURS = {"hang": hang, "stuck": stuck, "slow": slow, "crash": crash, "broken": broken}


def scripted(slide_path: Path, out_dir: Path, options, **kw) -> dict:
    """Per-job behaviour from the job's options (`extra.behave`: hang, stuck, slow, crash, broken; else tiny),
    so one runner can run a hung job and then a good one."""
    return BEHAVIOURS.get(options.extra.get("behave"), tiny)(slide_path, out_dir, options, **kw)
