"""One inference protocol for the pipeline, whatever runs the models (onnxruntime in-process or Triton).

Implementations provide only `infer` (one model, named numpy tensors in and out), `health` and `close`;
`BundleBackend` derives the pipeline-level calls (patch batches, aggregation, heads) from the bundle
manifest, so both backends agree on shapes, chunking and error handling by construction.
"""

from __future__ import annotations

import contextvars
import functools
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Protocol, runtime_checkable

import numpy as np

from service.errors import BundleError, InvalidParameterError
from service.inference.bundle import Bundle, ModelSpec
from service.obs import tracing

_NP_DTYPES = {
    "uint8": np.uint8,
    "int8": np.int8,
    "int32": np.int32,
    "int64": np.int64,
    "float16": np.float16,
    "float32": np.float32,
    "bool": np.bool_,
}


@runtime_checkable
class Backend(Protocol):
    """What the pipeline calls. Shapes: pixels uint8 [B, S, S, 3] -> float32 [B, D];
    features float32 [N, D] -> {embedding [E], attention [N], tokens [N, E]}."""

    bundle: Bundle

    def infer(self, model_name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def embed_patches(self, pixels: np.ndarray) -> np.ndarray: ...

    def aggregate(self, features: np.ndarray) -> dict[str, np.ndarray]: ...

    def run_head(self, name: str, x: np.ndarray) -> dict[str, np.ndarray]: ...

    def health(self) -> dict: ...

    def close(self) -> None: ...


def np_dtype(name: str) -> type:
    return _NP_DTYPES[name]


class BundleBackend:
    """Pipeline-level calls on top of `infer`. Subclasses implement `infer` and `health`.

    `max_chunk`: the largest batch sent in one request (the model's `max_batch_size` caps it too);
    `parallel`: how many chunks may be in flight at once (>1 lets Triton's dynamic batcher fuse them).
    """

    def __init__(self, bundle: Bundle, *, max_chunk: int | None = None, parallel: int = 1) -> None:
        self.bundle = bundle
        self.max_chunk = max_chunk
        self.parallel = max(1, parallel)
        self._pool: ThreadPoolExecutor | None = None
        # (model name, seconds) after each model call: the job runner hands its timings to the metrics layer
        self.on_infer: Callable[[str, float], None] | None = None

    @contextmanager
    def timed(self, model_name: str) -> Iterator[None]:
        """Time one model call (the backend's own request, not input checks) for `on_infer`."""
        start = time.perf_counter()
        try:
            with tracing.span(f"infer {model_name}", **{"mstar.model": model_name}):
                yield
        finally:
            hook = self.on_infer
            if hook is not None:
                hook(model_name, time.perf_counter() - start)

    # -- to implement ----------------------------------------------------------------------------
    def infer(self, model_name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def health(self) -> dict:
        raise NotImplementedError

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- derived ---------------------------------------------------------------------------------
    def _check_inputs(self, spec: ModelSpec, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Refuse wrong names, dtypes and static dims with `InvalidParameterError` before the runtime does so
        with an opaque message."""
        want = {t.name: t for t in spec.inputs}
        if set(inputs) != set(want):
            raise InvalidParameterError(f"model {spec.name!r} takes inputs {sorted(want)}, got {sorted(inputs)}")
        out = {}
        for name, arr in inputs.items():
            t = want[name]
            arr = np.asarray(arr)
            if arr.dtype != np_dtype(t.dtype):
                raise InvalidParameterError(f"{spec.name}.{name}: expected {t.dtype}, got {arr.dtype}")
            if arr.ndim != len(t.shape) or any(
                isinstance(d, int) and d != n for d, n in zip(t.shape, arr.shape, strict=True)
            ):
                raise InvalidParameterError(f"{spec.name}.{name}: expected shape {t.shape}, got {list(arr.shape)}")
            if arr.size == 0:
                raise InvalidParameterError(f"{spec.name}.{name}: empty input {list(arr.shape)}")
            out[name] = np.ascontiguousarray(arr)
        return out

    def _map(self, fn, items: list) -> list:
        """`fn` over `items`, up to `parallel` at once. Each call runs in a copy of the caller's context: pool
        threads do not inherit it, and without it each model call's span would start a trace of its own instead
        of nesting in the job's stage."""
        if self.parallel == 1 or len(items) == 1:
            return [fn(i) for i in items]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.parallel, thread_name_prefix="mstar-infer")
        calls = [functools.partial(contextvars.copy_context().run, fn, i) for i in items]  # one context per call
        return list(self._pool.map(lambda call: call(), calls))

    def infer_batched(self, model_name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`infer` for batch-first models of any batch size: chunks of at most `max_batch_size` (in flight
        together when `parallel` > 1), outputs concatenated in order."""
        spec = self.bundle.model(model_name)
        n = len(next(iter(inputs.values())))
        cap = spec.max_batch_size or n
        if self.max_chunk:
            cap = min(cap, self.max_chunk)
        if n <= cap:
            return self.infer(model_name, inputs)
        starts = list(range(0, n, cap))
        parts = self._map(lambda s: self.infer(model_name, {k: v[s : s + cap] for k, v in inputs.items()}), starts)
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def embed_patches(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [B, S, S, 3] RGB patches -> float32 [B, D] embeddings."""
        spec = self.bundle.patch_encoder
        pixels = np.asarray(pixels)
        if pixels.ndim == 3:
            pixels = pixels[None]
        out = self.infer_batched(spec.name, {spec.inputs[0].name: pixels})
        return out[spec.outputs[0].name]

    def aggregate(self, features: np.ndarray) -> dict[str, np.ndarray]:
        """float32 [N, D] patch features -> {embedding [E], attention [N], tokens [N, E]}."""
        spec = self.bundle.aggregator
        if spec is None:
            raise BundleError(f"bundle {self.bundle.root} has no aggregator")
        feats = np.asarray(features)
        x = spec.inputs[0]
        added = feats.ndim == 2 and len(x.shape) == 3
        out = self.infer(spec.name, {x.name: feats[None] if added else feats})
        return {k: v[0] for k, v in out.items()} if added else out

    def run_head(self, name: str, x: np.ndarray) -> dict[str, np.ndarray]:
        """Run one head on its single input: patch features [N, D] (MIL heads) or a slide embedding
        [E] / [B, E] (linear heads). An input one rank short of the declared one gets (then loses) a batch
        axis."""
        spec = self.bundle.model(name)
        x = np.asarray(x)
        t = spec.inputs[0]
        squeeze = x.ndim == len(t.shape) - 1
        out = self.infer(spec.name, {t.name: x[None] if squeeze else x})
        return {k: v[0] for k, v in out.items()} if squeeze else out

    def run_heads(self, features: np.ndarray | None, slide_embedding: np.ndarray | None = None) -> dict[str, dict]:
        """Every head of the bundle, summarised (probabilities by label; survival curve and risk)."""
        results = {}
        for spec in self.bundle.heads:
            x = features if spec.consumes == "patch_features" else slide_embedding
            if x is not None:
                results[spec.name] = summarize_head(spec, self.run_head(spec.name, x))
        return results


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    z = x - x.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def summarize_head(spec: ModelSpec, outputs: dict[str, np.ndarray]) -> dict:
    """Raw head outputs -> what a user reads. Classifier: softmax over `logits`. Survival (discrete time, as
    mSTAR/PORPOISE): hazards = sigmoid(logits), S(t) = cumprod(1 - h), risk = -sum(S) (higher = worse)."""
    logits = np.asarray(outputs[spec.outputs[0].name], dtype=np.float64)
    if spec.role == "classifier":
        p = softmax(logits)
        labels = spec.labels or [str(i) for i in range(p.shape[-1])]
        if p.ndim == 1:
            return {
                "probabilities": dict(zip(labels, p.tolist(), strict=True)),
                "label": labels[int(p.argmax())],
            }
        return {"probabilities": p.tolist(), "labels": labels}
    if spec.role == "survival":
        hazards = 1.0 / (1.0 + np.exp(-logits))
        surv = np.cumprod(1.0 - hazards, axis=-1)
        return {
            "hazards": hazards.tolist(),
            "survival": surv.tolist(),
            "risk": (-surv.sum(-1)).tolist(),
            "bin_edges": spec.bin_edges,
        }
    return {k: np.asarray(v).tolist() for k, v in outputs.items()}
