"""The one place where the steps of an analysis are chained: slide -> tiles -> features -> aggregator -> heads.

The CLI (`mstar analyze`), the embedded job runner and the Celery tasks are thin wrappers around
`run_analysis`. Contract (stable, other modules code against it):

    run_analysis(slide_path, out_dir, options, *, bundle_dir=None, progress=None, should_cancel=None) -> dict

writes into `out_dir` (atomically, file by file): `result.json`, `features.h5` (CLAM/TRIDENT layout), `heatmap.png`
when an aggregator gives attention, and returns the result dict that `result.json` holds.
`progress(stage, fraction)` is called with stages "open", "tissue", "grid", "embed", "aggregate", "heads", "report",
"write"; `should_cancel()` is polled between batches and raises `JobCanceled` when true.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from service.errors import MstarError

ProgressFn = Callable[[str, float], None]
CancelFn = Callable[[], bool]

TASKS = ("embedding", "classification", "survival", "report", "zeroshot")


class JobCanceled(MstarError):
    code = "canceled"
    http_status = 409


@dataclass(frozen=True)
class AnalysisOptions:
    tasks: tuple[str, ...] = ("embedding", "classification", "survival", "report")
    prompts: tuple[str, ...] = ()
    mpp_override: float | None = None
    target_mpp: float | None = None  # None: the bundle's µm/px
    patch_size: int | None = None  # None: the bundle's patch size
    extra: dict = field(default_factory=dict)
