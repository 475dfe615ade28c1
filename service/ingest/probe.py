"""The slide check every ingest source goes through, run as a separate process:
`python -m service.ingest.probe PATH [--mpp X]` (`check_slide` starts it and waits).

Neither the gateway nor the batch submitter parses or decodes slide bytes itself (OpenSlide/libtiff/openjpeg
have had memory-safety bugs, and a hostile file must not take down the API). This process sniffs the container,
opens the slide, checks its µm/px and decodes a thumbnail, then prints one JSON line: `{"format", "info"}` or
`{"error": {"code", "message"}}`. A crash or timeout is reported by the parent as a corrupt slide.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.config import Settings

_ROOT = str(Path(__file__).resolve().parents[2])


def probe(path: str, mpp_override: float | None) -> dict:
    from service.slides.open import open_slide_checked

    with open_slide_checked(path, mpp_override=mpp_override) as reader:
        reader.thumbnail(256)  # decode the coarsest level: catches damaged pixel data, not just headers
        return {"format": getattr(reader, "format", None), "info": reader.describe()}


def main(argv: list[str] | None = None) -> int:
    from service.errors import MstarError

    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--mpp", type=float, default=None)
    ap.add_argument("--max-memory-mb", type=int, default=0)
    args = ap.parse_args(argv)
    # Limits first, before any decoder is loaded: no core dumps of patient data, and an address-space cap
    # that turns a decompression bomb into a MemoryError here instead of an OOM kill elsewhere.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if args.max_memory_mb:
        cap = args.max_memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    try:
        out = probe(args.path, args.mpp)
    except MstarError as err:
        # The staging file name is ours (random), but say nothing about paths to the client anyway.
        msg = str(err).replace(args.path, "upload").replace(args.path.rsplit("/", 1)[-1], "upload")
        msg = msg.replace("--mpp-override", "the mpp_override field")  # the CLI's wording, said the API's way
        out = {"error": {"code": err.code, "message": msg}}
    except MemoryError:
        out = {"error": {"code": "slide_too_large", "message": "the slide needs more memory than allowed"}}
    except Exception as err:  # any other reader failure on hostile bytes is a damaged file
        out = {
            "error": {
                "code": "corrupt_slide",
                "message": f"the slide could not be read ({type(err).__name__})",
            }
        }
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


#: check processes at once in this process (each imports the slide libraries: a few seconds of a core)
_PROBES = threading.BoundedSemaphore(max(2, os.cpu_count() or 2))


def check_slide(path: Path, mpp_override: float | None, settings: Settings) -> dict:
    """Open the slide in a child process; `{"format", "info"}` or the typed error it reported. Blocking: call it
    from a worker thread (the gateway) or a batch submitter, never on an event loop."""
    from service.errors import CorruptSlideError

    args = [sys.executable, "-m", "service.ingest.probe", str(path)]
    if mpp_override is not None:
        args += ["--mpp", repr(float(mpp_override))]
    if settings.validate_memory_mb:
        args += ["--max-memory-mb", str(settings.validate_memory_mb)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p),
        "OMP_NUM_THREADS": "1",
    }
    try:  # on timeout subprocess.run kills the child and waits for it
        with _PROBES:  # a burst of uploads queues here instead of starving every check past its time limit
            done = subprocess.run(
                args, capture_output=True, env=env, timeout=settings.validate_timeout_s, stdin=subprocess.DEVNULL
            )
    except subprocess.TimeoutExpired:
        raise CorruptSlideError(f"the slide could not be opened within {settings.validate_timeout_s:g} s") from None
    try:
        out = json.loads(done.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise CorruptSlideError(
            f"the slide reader stopped unexpectedly (exit status {done.returncode}); the file is damaged "
            "or not a supported slide"
        ) from None
    if "error" in out:
        raise error_class(out["error"]["code"])(out["error"]["message"])
    return out


def error_class(code: str) -> type:
    """The most specific `MstarError` subclass with this code (to re-raise what the child reported)."""
    from service.errors import MstarError

    stack: list[type[MstarError]] = [MstarError]
    while stack:
        cls = stack.pop()
        if cls.code == code:
            return cls
        stack.extend(cls.__subclasses__())
    return MstarError


async def probe_slide(path: Path, mpp_override: float | None, settings: Settings) -> dict:
    """`check_slide` from async code, on a worker thread."""
    return await asyncio.to_thread(check_slide, path, mpp_override, settings)


if __name__ == "__main__":
    sys.exit(main())
