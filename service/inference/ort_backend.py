"""onnxruntime in-process backend: the embedded default (`mstar analyze`, `mstar serve` without Triton).

Providers: TensorRT and CUDA execution providers when this onnxruntime build has them and a GPU answers,
else CPU. Sessions are created lazily per model and checked against the manifest (tensor names and
dtypes), so a bundle whose ONNX disagrees with its manifest is refused with `BundleError`.
`InferenceSession.run` is thread-safe, so one backend serves many threads.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from service.errors import BackendUnavailableError, BundleError
from service.inference.backend import BundleBackend
from service.inference.bundle import Bundle, ModelSpec

_ORT_TYPES = {
    "tensor(uint8)": "uint8",
    "tensor(int8)": "int8",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(float16)": "float16",
    "tensor(float)": "float32",
    "tensor(bool)": "bool",
}


def choose_providers(device: str = "auto", *, trt_cache: str | Path | None = None, fp16: bool = True) -> list:
    """Execution providers in priority order. `device`: "auto" (best available), "cpu", "cuda", "tensorrt"."""
    import onnxruntime as ort

    avail = set(ort.get_available_providers())
    cpu = ["CPUExecutionProvider"]
    cuda = [("CUDAExecutionProvider", {"device_id": 0})] if "CUDAExecutionProvider" in avail else []
    trt = []
    if "TensorrtExecutionProvider" in avail:
        opts = {"trt_fp16_enable": fp16}
        if trt_cache:
            opts |= {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(trt_cache)}
        trt = [("TensorrtExecutionProvider", opts)]
    if device == "cpu":
        return cpu
    if device == "cuda":
        if not cuda:
            raise BackendUnavailableError("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
        return cuda + cpu
    if device == "tensorrt":
        if not trt:
            raise BackendUnavailableError("onnxruntime has no TensorrtExecutionProvider")
        return trt + cuda + cpu
    if device != "auto":
        raise BackendUnavailableError(f"unknown onnxruntime device {device!r}")
    return trt + cuda + cpu


class OrtBackend(BundleBackend):
    """Runs the bundle's ONNX files with onnxruntime in this process."""

    def __init__(
        self,
        bundle: Bundle,
        *,
        device: str = "auto",
        intra_op_threads: int | None = None,
        max_chunk: int | None = 64,
        preload: bool = False,
    ) -> None:
        super().__init__(bundle, max_chunk=max_chunk, parallel=1)
        # engine cache outside the bundle: Triton would take any folder at the repository root for a model
        cache = Path(os.environ.get("MSTAR_TRT_CACHE", Path.home() / ".cache" / "mstar" / "trt")) / bundle.manifest.name
        self.providers = choose_providers(device, trt_cache=cache)
        self.intra_op_threads = intra_op_threads or int(os.environ.get("MSTAR_ORT_THREADS", "0"))
        self._sessions: dict = {}
        self._lock = threading.Lock()
        if preload:
            for m in bundle.manifest.models:
                self.session(m.name)

    def session(self, model_name: str):
        sess = self._sessions.get(model_name)
        if sess is not None:
            return sess
        with self._lock:
            if model_name not in self._sessions:
                self._sessions[model_name] = self._open(self.bundle.model(model_name))
            return self._sessions[model_name]

    def _open(self, spec: ModelSpec):
        import onnxruntime as ort

        so = ort.SessionOptions()
        if self.intra_op_threads:
            so.intra_op_num_threads = self.intra_op_threads
        so.log_severity_level = 3
        # checked again as it is opened: a file replaced under a running worker was served unverified
        path = self.bundle.check_unchanged(spec.file, spec.sha256, f"model {spec.name!r}")
        try:
            sess = ort.InferenceSession(str(path), sess_options=so, providers=self.providers)
        except Exception as err:  # onnxruntime raises its own untyped errors for bad files
            raise BundleError(f"model {spec.name!r}: onnxruntime cannot load {path.name}: {err}") from err
        _check_signature(spec, sess)
        return sess

    def infer(self, model_name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.bundle.model(model_name)
        feeds = self._check_inputs(spec, inputs)
        sess = self.session(model_name)
        names = [t.name for t in spec.outputs]
        with self.timed(model_name):
            out = sess.run(names, feeds)
        return dict(zip(names, out, strict=True))

    def health(self) -> dict:
        return {
            "backend": "onnxruntime",
            "ok": True,
            "providers": [p if isinstance(p, str) else p[0] for p in self.providers],
            "loaded": sorted(self._sessions),
            "bundle": self.bundle.manifest.name,
        }

    def close(self) -> None:
        super().close()
        self._sessions.clear()


def _check_signature(spec: ModelSpec, sess) -> None:
    """The ONNX graph must have the tensors the manifest promises (names, dtypes, ranks)."""
    for kind, declared, actual in (
        ("input", spec.inputs, sess.get_inputs()),
        ("output", spec.outputs, sess.get_outputs()),
    ):
        got = {a.name: a for a in actual}
        for t in declared:
            a = got.get(t.name)
            if a is None:
                raise BundleError(f"model {spec.name!r}: ONNX has no {kind} {t.name!r} (has {sorted(got)})")
            fixed = [
                (want, have)
                for want, have in zip(t.shape, a.shape, strict=False)
                if isinstance(want, int) and isinstance(have, int) and want != have
            ]
            if _ORT_TYPES.get(a.type) != t.dtype or len(a.shape) != len(t.shape) or fixed:
                # a size the two disagree on (patch size, feature width, class count) failed every job in ORT
                raise BundleError(
                    f"model {spec.name!r} {kind} {t.name!r}: ONNX is {a.type} {list(a.shape)}, "
                    f"manifest says {t.dtype} {t.shape}"
                )
