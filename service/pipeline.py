"""The one place where the steps of an analysis are chained: slide -> tiles -> features -> aggregator -> heads.

The CLI (`mstar analyze`), the embedded job runner and the Celery tasks are thin wrappers around
`run_analysis`. Contract (stable, other modules code against it):

    run_analysis(slide_path, out_dir, options, *, bundle_dir=None, backend=None, progress=None,
                 should_cancel=None) -> dict

writes into `out_dir`: `result.json`, `features.h5` (CLAM/TRIDENT layout), `heatmap.png` when an aggregator gives
attention, `patch_scores.h5` (per-patch attention and class scores, tissue outline; `service.results.patch_scores`)
with a bundle, and returns the result dict that `result.json` holds. The files are written into a staging folder
inside `out_dir` and moved in together only when the analysis succeeded, `result.json` last; a previous analysis's
files that this one does not write go, so the folder never mixes two analyses (a failed run used to leave its new
`features.h5` beside the previous slide's `result.json`). Without a bundle it
stops after tiling (coordinates only) and says so in the result.
`progress(stage, fraction)` is called with stages "open", "grid", "embed", "aggregate", "heads", "report",
"write"; `should_cancel()` is polled between batches and raises `JobCanceled` when true.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from service.atomic import atomic_path
from service.errors import InvalidParameterError, MstarError, NonFiniteResultError

if TYPE_CHECKING:
    from service.inference.backend import BundleBackend
    from service.inference.bundle import Bundle

ProgressFn = Callable[[str, float], None]
CancelFn = Callable[[], bool]

TASKS = ("embedding", "classification", "survival", "report", "zeroshot")
DEFAULT_TASKS = ("embedding", "classification", "survival", "report")
RESULT_SCHEMA = "mstar.result/1"
DEMO_NOTICE = (
    "DEMO MODEL: trained on a small synthetic cohort for demonstration only. "
    "Its outputs are not a diagnosis and must not be used for patient care."
)
AI_REPORT_NOTICE = "AI-drafted text; a pathologist must review and sign any report."


class JobCanceled(MstarError):
    code = "canceled"
    http_status = 409


@dataclass(frozen=True)
class AnalysisOptions:
    tasks: tuple[str, ...] = DEFAULT_TASKS
    prompts: tuple[str, ...] = ()
    mpp_override: float | None = None
    target_mpp: float | None = None  # None: the bundle's µm/px (0.5 without a bundle)
    patch_size: int | None = None  # None: the bundle's patch size (224 without a bundle)
    batch_size: int = 64
    read_workers: int = 2
    tissue_threshold: float = 0.25
    region: dict | list | None = None  # GeoJSON polygon(s), level-0 px: only patches centred inside are read
    extra: dict = field(default_factory=dict)
    # an RNA-Seq profile (file bytes) for the bundle's slide + RNA head; patient data: never in to_json or logs
    rna: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.tasks) - set(TASKS))
        if unknown:
            raise InvalidParameterError(f"unknown task(s) {unknown}; choose from {list(TASKS)}")
        if "zeroshot" in self.tasks:  # checked before any tile is read: they were refused after the whole analysis
            if len(self.prompts) < 2:
                # a softmax over one prompt is 1.0 whatever the slide: the API has always asked for two
                raise InvalidParameterError("zero-shot scoring needs at least two prompts (one per class)")
            from service.inference.zeroshot import check_prompts

            check_prompts(self.prompts)
        if self.batch_size < 1 or self.read_workers < 1:
            raise InvalidParameterError("batch_size and read_workers must be >= 1")
        if self.region is not None:
            from service.results.roi import parse_region

            parse_region(self.region)

    def to_json(self) -> dict:
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if k != "rna"}
        if self.rna is not None:
            out["rna_profile"] = "given (not stored)"
        return out


class _Progress:
    """Calls the user's callback, and keeps stage timings for the result."""

    def __init__(self, fn: ProgressFn | None, should_cancel: CancelFn | None) -> None:
        self.fn = fn
        self.should_cancel = should_cancel
        self.timings: dict[str, float] = {}
        self._stage: str | None = None
        self._t = time.perf_counter()

    def __call__(self, stage: str, fraction: float) -> None:
        now = time.perf_counter()
        if stage != self._stage:
            if self._stage is not None:
                self.timings[self._stage] = round(self.timings.get(self._stage, 0.0) + now - self._t, 4)
            self._stage, self._t = stage, now
        if self.fn is not None:
            self.fn(stage, float(min(max(fraction, 0.0), 1.0)))
        self.check_cancel()

    def check_cancel(self) -> None:
        if self.should_cancel is not None and self.should_cancel():
            raise JobCanceled("the job was canceled")

    def finish(self) -> dict[str, float]:
        self("done", 1.0)
        return self.timings


def _write_json_atomic(path: Path, data: dict) -> None:
    bad = _non_finite_at(data)
    if bad is not None:
        raise NonFiniteResultError(f"the analysis produced a non-finite number at {bad}")
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n")


def _non_finite_at(node: object, at: str = "") -> str | None:
    """The dotted path of the first NaN or infinity in a result document, or None."""
    if isinstance(node, float):
        return None if math.isfinite(node) else (at or "(root)")
    if isinstance(node, dict):
        for key, value in node.items():
            found = _non_finite_at(value, f"{at}.{key}" if at else str(key))
            if found:
                return found
    elif isinstance(node, list | tuple):
        for i, value in enumerate(node):
            found = _non_finite_at(value, f"{at}[{i}]")
            if found:
                return found
    return None


def slide_fingerprint(path: Path) -> str:
    """sha256 of the slide's bytes (all files of a DICOM folder, in name order): results name the slide by
    content, never by its file name, which may carry patient identity."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        with open(f, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def open_backend(bundle: Bundle, kind: str = "onnxruntime", **kwargs: Any) -> BundleBackend:
    """The backend the settings ask for: in-process onnxruntime (default) or a Triton server."""
    if kind == "onnxruntime":
        from service.inference.ort_backend import OrtBackend

        return OrtBackend(bundle, **kwargs)
    if kind == "triton":
        from service.inference.triton_backend import TritonBackend

        return TritonBackend(bundle, **kwargs)
    raise InvalidParameterError(f"unknown backend {kind!r} (onnxruntime or triton)")


def backend_from_settings(bundle: Bundle) -> BundleBackend:
    """The backend `MSTAR_BACKEND` names (onnxruntime by default; `triton` at `MSTAR_TRITON_URL`)."""
    from service.config import Settings

    s = Settings()
    if s.backend == "triton":
        return open_backend(bundle, "triton", url=s.triton_url, protocol=s.triton_protocol)
    return open_backend(bundle, "onnxruntime", device=s.ort_device)


def _embed(
    reader, grid, backend: BundleBackend, options: AnalysisOptions, prog: _Progress, tile_decoder: str
) -> tuple[np.ndarray, dict]:
    """The grid's patch features, and how its patches were read (`PatchReader.read_info`)."""
    from service.embedding import EmbedStats, embed_grid

    prog("embed", 0.0)
    stats = EmbedStats()
    feats = embed_grid(
        reader,
        grid,
        backend.embed_patches,
        backend.bundle.manifest.embed_dim,
        batch_size=options.batch_size,
        workers=options.read_workers,
        decoder=tile_decoder,
        progress=lambda done, total: prog("embed", done / total),  # also polls cancel, raising JobCanceled
        stats=stats,
    )
    return feats, stats.read


def _model_refs(bundle: Bundle) -> dict:
    return {m.name: {"role": m.role, "version": m.version, "sha256": m.sha256} for m in bundle.manifest.models}


def tiling_for(pre: Any, options: AnalysisOptions) -> tuple[float, int]:
    """(µm/px of the encoder's input patches, input size) for a bundle's preprocessing and the job's options.

    With a field of view in the bundle (official mSTAR/UNI: 128 µm cut at 0.5 µm/px, resized to 224 px) the
    tiler is asked for `field_um / patch_size` µm/px, so each patch covers the field the model was trained on
    whatever the slide's own resolution. A job may not change the scale a bundle was trained at."""
    target_mpp = options.target_mpp or (pre.target_mpp if pre else 0.5)
    patch_size = options.patch_size or (pre.patch_size if pre else 224)
    if pre is None:
        return target_mpp, patch_size
    if patch_size != pre.patch_size:
        raise InvalidParameterError(f"the bundle's patch encoder takes {pre.patch_size} px patches, not {patch_size}")
    if abs(target_mpp - pre.target_mpp) / pre.target_mpp > 0.05:
        raise InvalidParameterError(
            f"the bundle was trained at {pre.target_mpp} µm/px; analysing at {target_mpp} µm/px would "
            "feed it patches at the wrong scale"
        )
    return target_mpp * pre.grid_mpp / pre.target_mpp, patch_size


def run_analysis(
    slide_path: str | Path | Any,
    out_dir: str | Path,
    options: AnalysisOptions | None = None,
    *,
    bundle_dir: str | Path | None = None,
    backend: BundleBackend | None = None,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
) -> dict:
    """Analyse one slide end to end and write the result files into `out_dir`. See the module docstring."""
    from service.config import Settings
    from service.inference.bundle import load_bundle
    from service.slides.grid import build_grid
    from service.slides.h5io import write_h5
    from service.slides.open import open_slide

    options = options or AnalysisOptions()
    tile_decoder = Settings().tile_decoder  # read (and a bad MSTAR_* value refused) before any work
    # A slide that is not a file (a PACS series) comes as a source object that opens its own reader.
    source = slide_path if hasattr(slide_path, "open_reader") else None
    if source is None:
        slide_path = Path(slide_path)
    final_dir = Path(out_dir)
    prog = _Progress(progress, should_cancel)
    started = time.time()

    prog("open", 0.0)
    bundle = backend.bundle if backend is not None else (load_bundle(bundle_dir) if bundle_dir else None)
    pre = bundle.manifest.preprocessing if bundle is not None else None
    grid_mpp, patch_size = tiling_for(pre, options)
    if bundle is not None and "zeroshot" in options.tasks and bundle.text_encoder is None:
        raise InvalidParameterError("zero-shot scoring needs a bundle with a text encoder; this one has none")
    owns_backend = backend is None and bundle is not None
    if owns_backend:
        backend = backend_from_settings(bundle)
    final_dir.mkdir(parents=True, exist_ok=True)
    out_dir = Path(tempfile.mkdtemp(prefix=".analysis-", dir=final_dir))
    try:
        opened = (
            source.open_reader(options.mpp_override)
            if source is not None
            else open_slide(slide_path, mpp_override=options.mpp_override)
        )
        with opened as reader:
            prog("grid", 0.0)
            grid = build_grid(
                reader, target_mpp=grid_mpp, patch_size=patch_size, tissue_threshold=options.tissue_threshold
            )
            if options.region is not None:
                from service.results.roi import restrict_grid

                grid = restrict_grid(grid, options.region)
            result: dict[str, Any] = {
                "schema": RESULT_SCHEMA,
                "slide": {
                    "sha256": source.fingerprint() if source is not None else slide_fingerprint(slide_path),
                    **reader.describe(),
                },
                "tiling": {**grid.summary(), "field_um": round(grid_mpp * patch_size, 4)},
                "options": options.to_json(),
            }
            if bundle is None:
                prog("write", 0.0)
                write_h5(out_dir / "features.h5", grid)
                result["status"] = "tiled"
                result["note"] = "no model bundle given: stopped after tiling (coordinates only)"
            else:
                result.update(_analyze_with_models(reader, grid, bundle, backend, options, prog, out_dir, tile_decoder))
            if source is not None:
                result["source"] = source.transfer()
        result["timings"] = {"started": started, "stages_s": prog.finish(), "total_s": round(time.time() - started, 3)}
        n_embed = result["tiling"]["patches"]
        embed_s = result["timings"]["stages_s"].get("embed")
        if embed_s:
            result["timings"]["patches_per_s"] = round(n_embed / embed_s, 2)
        _write_json_atomic(out_dir / "result.json", result)
        _publish(out_dir, final_dir)
        return result
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
        if owns_backend and backend is not None:
            backend.close()


#: what an analysis may leave in its folder (`annotations.geojson`: `mstar analyze --geojson`, written after it)
OUTPUT_NAMES = ("result.json", "features.h5", "patch_scores.h5", "heatmap.png", "annotations.geojson")


def _publish(stage: Path, out_dir: Path) -> None:
    """Move a finished analysis from `stage` into `out_dir`: the previous `result.json` goes first and the new one
    comes last, so no moment shows a result beside another analysis's files; a previous analysis's other outputs
    that this one did not write go too."""
    (out_dir / "result.json").unlink(missing_ok=True)
    for name in OUTPUT_NAMES:
        if name != "result.json" and not (stage / name).exists():
            (out_dir / name).unlink(missing_ok=True)
    for path in sorted(stage.iterdir(), key=lambda p: p.name == "result.json"):
        os.replace(path, out_dir / path.name)


def _analyze_with_models(
    reader,
    grid,
    bundle: Bundle,
    backend: BundleBackend,
    options: AnalysisOptions,
    prog: _Progress,
    out_dir: Path,
    tile_decoder: str = "cpu",
) -> dict:
    from service.heatmap import render_heatmap
    from service.slides.h5io import write_h5

    m = bundle.manifest
    res: dict[str, Any] = {
        "status": "analyzed",
        "bundle": {"name": m.name, "demo": m.demo, "models": _model_refs(bundle)},
    }
    if m.demo:
        res["notice"] = DEMO_NOTICE
    feats, res["reading"] = _embed(reader, grid, backend, options, prog, tile_decoder)
    prog("write", 0.0)
    write_h5(
        out_dir / "features.h5",
        grid,
        feats,
        extra_attrs={"encoder": bundle.patch_encoder.name, "encoder_sha256": bundle.patch_encoder.sha256},
    )
    slide_emb = attention = None
    if bundle.aggregator is not None:
        prog("aggregate", 0.0)
        agg = backend.aggregate(feats)
        slide_emb = np.asarray(agg["embedding"], np.float32).reshape(-1)
        attention = np.asarray(agg["attention"], np.float64).reshape(-1)
        _append_h5(out_dir / "features.h5", "attention", attention.astype(np.float32))
        if "embedding" in options.tasks:
            res["embedding"] = {"dim": int(slide_emb.size), "values": slide_emb.round(6).tolist()}
        render_heatmap(out_dir / "heatmap.png", reader, grid, attention, title="Aggregator attention")
        top = np.argsort(-attention)[: min(10, attention.size)]
        res["attention"] = {
            "top_patches": [
                {"x": int(grid.coords[i, 0]), "y": int(grid.coords[i, 1]), "score": round(float(attention[i]), 6)}
                for i in top
            ]
        }
    elif "embedding" in options.tasks:
        mean = feats.mean(axis=0)
        res["embedding"] = {"dim": int(mean.size), "values": mean.round(6).tolist(), "pooling": "mean of patches"}
    prog("heads", 0.0)
    heads = backend.run_heads(feats, slide_emb)
    _write_patch_scores(out_dir, backend, grid, feats, attention)
    specs = {h.name: h for h in bundle.heads}
    if "classification" in options.tasks:
        res["classification"] = {k: v for k, v in heads.items() if specs[k].role == "classifier"}
    if "survival" in options.tasks:
        surv = {}
        for k, v in heads.items():
            if specs[k].role == "survival":
                surv[k] = {**v, "interpretation": "risk = -sum of the survival curve; higher means worse"}
        res["survival"] = surv
    if options.rna is not None:
        res["multimodal"] = multimodal_result(
            bundle, feats, options.rna, res.get("survival"), slide_classification=res.get("classification")
        )
    if "report" in options.tasks:
        prog("report", 0.0)
        res["report"] = _report(bundle, backend, feats)
    if "zeroshot" in options.tasks:
        res["zeroshot"] = _zeroshot(bundle, backend, feats, slide_emb, options.prompts)
    return res


def multimodal_result(
    bundle: Bundle,
    feats: np.ndarray,
    rna: bytes,
    slide_survival: dict | None,
    *,
    slide_classification: dict | None = None,
) -> dict:
    """The bundle's slide + RNA head on this slide and profile, next to what the slide alone gives for the same
    kind of task (issue 18): the risk of each slide-only survival head beside a fused risk, the probabilities of
    each slide-only classifier beside fused probabilities. Gene-mapping counts only; the profile's values are not
    repeated."""
    from service.inference.fusion import RnaFusion

    out = RnaFusion(bundle).predict(feats, rna)
    if slide_survival and "risk" in out:
        out["slide_only_risk"] = {k: v.get("risk") for k, v in slide_survival.items()}
    if slide_classification and "probabilities" in out:
        out["slide_only_probabilities"] = {k: v.get("probabilities") for k, v in slide_classification.items()}
    return out


def _write_patch_scores(out_dir: Path, backend: BundleBackend, grid, feats: np.ndarray, attention) -> None:
    """`patch_scores.h5`: what the viewer, the QuPath export and re-rendered heatmaps read."""
    from service.results import patch_scores
    from service.slides.h5io import grid_attrs

    scores = patch_scores.compute(backend, grid, feats, attention, grid_attrs(grid))
    patch_scores.write(out_dir / patch_scores.FILE_NAME, scores)


def _append_h5(path: Path, name: str, data: np.ndarray) -> None:
    """A per-patch array next to `features` (same row order), e.g. the aggregator's attention, which DICOM
    annotations and heatmaps are built from."""
    import h5py

    with h5py.File(path, "a") as f:
        f.create_dataset(name, data=data)


def _report(bundle: Bundle, backend: BundleBackend, feats: np.ndarray) -> dict:
    from service.inference import report as report_mod

    if not report_mod.available(bundle):
        return {"available": False, "reason": "this bundle has no report decoder"}
    text = report_mod.generate(bundle, backend, feats)
    return {"available": True, "text": text, "ai_generated": True, "notice": AI_REPORT_NOTICE}


def _zeroshot(
    bundle: Bundle, backend: BundleBackend, feats: np.ndarray, slide_emb: np.ndarray | None, prompts: tuple[str, ...]
) -> dict:
    from service.inference import zeroshot as zs

    if not zs.available(bundle):
        raise InvalidParameterError("this bundle has no text encoder, so zero-shot prompts cannot be scored")
    return zs.score(bundle, backend, feats, slide_emb, list(prompts))
