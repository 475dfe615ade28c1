"""numba compilation for the slide engine's compiled loops (today the two passes of `area_resize`).

numba is imported on first use only, so processes that never read patches (the API gateway) do not load it.
Kernels are compiled with the GIL released (`nogil`: the reader threads run them in parallel) and cached on
disk: next to the module, or in the user's cache directory (NUMBA_CACHE_DIR overrides) where that is not
writable; where neither is (a read-only image with no home), each process compiles them once (about a second).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

_lock = threading.Lock()


def compile_kernel(fn: Callable) -> Callable:
    """`numba.njit(nogil=True, cache=True)(fn)`, uncached where numba finds no writable cache location."""
    with _lock:
        import numba

        try:
            return numba.njit(nogil=True, cache=True)(fn)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return numba.njit(nogil=True)(fn)
