"""Keep freed memory in the process for the next tile instead of handing it back to the kernel (glibc malloc).

Why: the patch reader frees and allocates 0.2-3 MB tile arrays and 10-50 MB batches all the time. With glibc's
defaults many of them come from fresh pages, which the kernel maps and zeroes one page fault at a time: freed
arrays are mmap'd memory given back at once, and the heaps are trimmed. A process that streamed the bench's
8,880 px OME-TIFF four times took 15-38 page faults a patch on every pass, and 0-2 with the thresholds below
(arrays up to 64 MB from the heap, up to 128 MB of free heap kept before trimming), at 0.55-0.74 against
0.72-0.84 CPU ms a patch; the 4x SVS pyramid 0-2 against 31-38 faults. Processes whose earlier large frees had
already raised glibc's adaptive thresholds (the bench's own, after building its slides) fault little either
way. `tests/test_slides_memory.py` counts the faults.

The cost is memory the process keeps after a slide: at most the trim threshold of free heap per malloc arena,
reused by the next slide. Where the user has set glibc's own knobs (`MALLOC_MMAP_THRESHOLD_`,
`MALLOC_TRIM_THRESHOLD_`, `GLIBC_TUNABLES`) nothing is changed, and on a C library without `mallopt` (musl,
macOS) neither.
"""

from __future__ import annotations

import ctypes
import functools
import os

MMAP_THRESHOLD = 64 << 20  # arrays below this come from the heap, and are reused from it
TRIM_THRESHOLD = 128 << 20  # free heap kept before any is given back to the kernel
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_USER_KNOBS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


@functools.cache
def keep_freed_memory() -> bool:
    """Apply the thresholds once per process; True where they are in force. (Two threads racing on the first
    call both apply the same values: harmless.)"""
    return _apply()


def _apply() -> bool:
    if any(k in os.environ for k in _USER_KNOBS):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
