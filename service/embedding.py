"""The one embedding loop: stream a grid's patches and run them through a patch encoder, batch by batch.

`mstar analyze` (service.pipeline), `mstar extract` (training.extract) and the benchmarks all call
`embed_grid`, so there is one place that decides how reading and inference overlap: a pool of reader threads
(`iter_batches`) keeps up to `max_inflight` batches decoded ahead while the calling thread runs the encoder on
the current one. Decoders (libjpeg-turbo, OpenJPEG, OpenSlide) and the inference runtimes release the GIL, so
the two sides run on different cores and neither waits as long as the other is not the bottleneck.

The encoder is any callable `uint8 [B, S, S, 3] -> float [B, D]` (an onnxruntime/Triton backend's
`embed_patches`, a torch module wrapped by training), so this module stays free of torch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from service.errors import InvalidParameterError, MstarError

if TYPE_CHECKING:
    from service.slides.base import SlideReader
    from service.slides.grid import TileGrid

EncodeFn = Callable[[np.ndarray], np.ndarray]
ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], bool]


class EmbeddingCanceled(MstarError):
    code = "canceled"
    http_status = 409


@dataclass
class EmbedStats:
    """Where the time of one `embed_grid` call went: `wait_s` is time the encoder sat idle waiting for
    patches (reading is the bottleneck when it is a large share of `total_s`), `encode_s` the encoder's."""

    patches: int = 0
    batches: int = 0
    total_s: float = 0.0
    wait_s: float = 0.0
    encode_s: float = 0.0
    read: dict = field(default_factory=dict)  # iter_batches' read_info: path, tile decoder, tiles decoded

    @property
    def patches_per_s(self) -> float:
        return self.patches / self.total_s if self.total_s > 0 else 0.0


def embed_grid(
    reader: SlideReader,
    grid: TileGrid,
    encode: EncodeFn,
    dim: int,
    *,
    batch_size: int = 64,
    workers: int = 2,
    max_inflight: int | None = None,
    fast: bool | str = "auto",
    decoder: str = "cpu",
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    stats: EmbedStats | None = None,
) -> np.ndarray:
    """float32 `[N, dim]` features of every grid patch, in grid order.

    `progress(done, total)` is called after every batch (an exception it raises, e.g. a job's cancel error,
    stops the loop and the readers); `should_cancel()` is polled before each batch and raises
    `EmbeddingCanceled` when true. `stats`, when given, is filled with the timing split.
    """
    from service.slides.stream import iter_batches

    if dim < 1:
        raise InvalidParameterError(f"dim must be >= 1, got {dim}")
    n = len(grid.coords)
    feats = np.empty((n, dim), np.float32)
    st = stats if stats is not None else EmbedStats()
    st.patches = n
    if n == 0:
        return feats
    done = 0
    t0 = time.perf_counter()
    batches = iter_batches(
        reader,
        grid,
        batch_size=batch_size,
        workers=workers,
        fast=fast,
        max_inflight=max_inflight,
        decoder=decoder,
        info=st.read,
    )
    try:
        while True:
            if should_cancel is not None and should_cancel():
                raise EmbeddingCanceled("canceled while embedding patches")
            t_wait = time.perf_counter()
            item = next(batches, None)
            t_enc = time.perf_counter()
            st.wait_s += t_enc - t_wait
            if item is None:
                break
            patches, _coords = item
            b = len(patches)
            out = np.asarray(encode(patches))
            if out.shape != (b, dim):
                raise MstarError(f"the encoder returned shape {out.shape} for a batch of {b}; expected ({b}, {dim})")
            feats[done : done + b] = out
            st.encode_s += time.perf_counter() - t_enc
            done += b
            st.batches += 1
            if progress is not None:
                progress(done, n)
    finally:
        batches.close()
        st.total_s = time.perf_counter() - t0
    return feats
