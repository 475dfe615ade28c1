"""Triton backend over `tritonclient`: gRPC by default, HTTP too; tensors always travel binary.

Many requests in flight: a batch bigger than the model's `max_batch_size` is split into chunks that are
sent concurrently from a thread pool (one client per thread, since the HTTP client is not thread-safe),
so Triton's dynamic batcher can fuse them with other workers' requests. The model names and tensor
names come from the same bundle manifest the in-process backend uses; only the transport differs.
"""

from __future__ import annotations

import contextlib
import threading
import time

import numpy as np

from service.errors import BackendUnavailableError, BundleError
from service.inference.backend import BundleBackend
from service.inference.bundle import Bundle


class TritonBackend(BundleBackend):
    def __init__(
        self,
        bundle: Bundle,
        url: str = "127.0.0.1:8001",
        *,
        protocol: str = "grpc",
        parallel: int = 4,
        max_chunk: int | None = None,
        timeout_s: float = 120.0,
        priority: int = 0,
    ) -> None:
        super().__init__(bundle, max_chunk=max_chunk, parallel=parallel)
        if protocol not in ("grpc", "http"):
            raise BackendUnavailableError(f"unknown Triton protocol {protocol!r} (grpc or http)")
        self.url = url
        self.protocol = protocol
        self.timeout_s = timeout_s
        self.priority = priority  # 0 = the model's default level; 1 = interactive, 2 = batch
        self._local = threading.local()
        self._clients: list = []
        self._clients_lock = threading.Lock()

    # -- transport -------------------------------------------------------------------------------
    @property
    def _mod(self):
        if self.protocol == "grpc":
            import tritonclient.grpc as mod
        else:
            import tritonclient.http as mod
        return mod

    def client(self):
        c = getattr(self._local, "client", None)
        if c is None:
            if self.protocol == "grpc":
                c = self._mod.InferenceServerClient(self.url)
            else:
                c = self._mod.InferenceServerClient(
                    self.url, connection_timeout=self.timeout_s, network_timeout=self.timeout_s
                )
            self._local.client = c
            with self._clients_lock:
                self._clients.append(c)
        return c

    def infer(self, model_name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from tritonclient.utils import InferenceServerException, np_to_triton_dtype

        spec = self.bundle.model(model_name)
        feeds = self._check_inputs(spec, inputs)
        mod = self._mod
        req = []
        for name, arr in feeds.items():
            i = mod.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
            if self.protocol == "http":
                i.set_data_from_numpy(arr, binary_data=True)
            else:
                i.set_data_from_numpy(arr)
            req.append(i)
        outs = [
            mod.InferRequestedOutput(t.name, binary_data=True)
            if self.protocol == "http"
            else mod.InferRequestedOutput(t.name)
            for t in spec.outputs
        ]
        kwargs = {"model_version": str(spec.version), "outputs": outs, "priority": self.priority}
        if self.protocol == "grpc":
            kwargs["client_timeout"] = self.timeout_s
        try:
            with self.timed(model_name):
                res = self.client().infer(spec.name, req, **kwargs)
        except InferenceServerException as err:
            raise BackendUnavailableError(f"Triton at {self.url} failed on {spec.name!r}: {err.message()}") from err
        return {t.name: res.as_numpy(t.name) for t in spec.outputs}

    # -- service checks --------------------------------------------------------------------------
    def health(self) -> dict:
        from tritonclient.utils import InferenceServerException

        c = self.client()
        info: dict = {"backend": "triton", "url": self.url, "protocol": self.protocol, "models": {}}
        try:
            info["live"] = bool(c.is_server_live())
            info["ready"] = bool(c.is_server_ready())
            for m in self.bundle.manifest.models:
                info["models"][m.name] = bool(c.is_model_ready(m.name, str(m.version)))
        except (InferenceServerException, OSError) as err:
            info |= {"live": False, "ready": False, "error": str(err)}
        info["ok"] = bool(info.get("ready")) and all(info["models"].values()) and len(info["models"]) > 0
        return info

    def wait_ready(self, timeout_s: float = 60.0) -> dict:
        """Poll until the server and every bundle model is ready; `BackendUnavailableError` on timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            h = self.health()
            if h["ok"]:
                return h
            if time.monotonic() > deadline:
                raise BackendUnavailableError(f"Triton at {self.url} not ready after {timeout_s:.0f} s: {h}")
            time.sleep(0.25)

    def statistics(self, model_name: str) -> dict:
        """The server's inference statistics for one model (request vs execution counts, batch sizes)."""
        spec = self.bundle.model(model_name)
        c = self.client()
        if self.protocol == "grpc":
            stats = c.get_inference_statistics(spec.name, str(spec.version), as_json=True)
        else:
            stats = c.get_inference_statistics(spec.name, str(spec.version))
        found = stats.get("model_stats") or []
        if not found:
            raise BundleError(f"Triton has no statistics for {spec.name!r}")
        return found[0]

    def close(self) -> None:
        super().close()
        with self._clients_lock:
            for c in self._clients:
                with contextlib.suppress(Exception):  # a dead channel must not mask the caller's error
                    c.close()
            self._clients.clear()
        self._local = threading.local()
