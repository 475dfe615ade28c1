"""`service.slides.memory`: freed arrays stay in the process for the next ones (no page faults to get them back),
unless the user has set glibc's own malloc knobs. Counted in page faults, not timed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# 40 arrays of 1 MB, freed, three times over: the third round's page faults. glibc's defaults give the freed heap
# back to the kernel (its trim threshold follows the mmap threshold, here 2 MB), so each round faults the 40 MB
# in again (about 10,000 faults of 4 KB); kept, the third round reuses it.
PROBE = textwrap.dedent(
    """
    import resource
    import numpy as np
    from service.slides.memory import keep_freed_memory
    applied = keep_freed_memory()
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        arrays = [np.ones(1 << 20, np.uint8) for _ in range(40)]
        del arrays
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def _probe(**env: str) -> tuple[bool, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**clean, "PYTHONPATH": str(ROOT), **env},
        check=True,
    ).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_arrays_are_reused_without_page_faults() -> None:
    applied, kept = _probe()
    user_set, given_back = _probe(GLIBC_TUNABLES="glibc.malloc.check=0")  # the user's knobs: nothing changed
    assert applied and not user_set
    assert kept < 1_000 < 5_000 < given_back, (kept, given_back)
