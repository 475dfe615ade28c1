"""Triton Python-backend model that runs this version directory's `model.onnx` with onnxruntime.

Copied by `training.export.triton` into `<model>/<version>/model.py`. It exists because the `tritonserver`
shipped in the `nvidia-pytriton` wheel has no onnxruntime backend: the `cpu_python` config selects it,
and the outputs are those of the very ONNX file that the GPU configs serve with the onnxruntime backend.
For batch-first models (`max_batch_size > 0`) the requests that Triton's dynamic batcher hands to one
`execute` call are concatenated into one onnxruntime run and split back, so batching really happens.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in (cfg.get("parameters") or {}).items()}
        self.max_batch = int(cfg.get("max_batch_size", 0))
        self.inputs = [t["name"] for t in cfg["input"]]
        self.outputs = [t["name"] for t in cfg["output"]]
        path = os.path.join(args["model_repository"], args["model_version"], params.get("onnx_file", "model.onnx"))
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(params.get("intra_op_threads", "0") or 0)
        self.session = ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])

    def _run(self, feeds):
        return self.session.run(self.outputs, feeds)

    def _response(self, arrays):
        return pb_utils.InferenceResponse(
            [pb_utils.Tensor(n, np.ascontiguousarray(a)) for n, a in zip(self.outputs, arrays, strict=False)]
        )

    def _error(self, err):
        return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(f"{type(err).__name__}: {err}"))

    def execute(self, requests):
        try:
            arrays = [[pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.inputs] for r in requests]
        except Exception as err:  # a malformed request fails alone, with a message
            return [self._error(err) for _ in requests]
        if self.max_batch > 0 and len(requests) > 1:
            sizes = [a[0].shape[0] for a in arrays]
            try:
                feeds = {n: np.concatenate([a[i] for a in arrays]) for i, n in enumerate(self.inputs)}
                outs = self._run(feeds)
            except Exception:
                outs = None  # incompatible shapes: fall back to one run per request below
            if outs is not None:
                cuts = np.cumsum(sizes)[:-1]
                parts = [np.split(o, cuts) for o in outs]
                return [self._response([p[k] for p in parts]) for k in range(len(requests))]
        responses = []
        for a in arrays:
            try:
                responses.append(self._response(self._run(dict(zip(self.inputs, a, strict=False)))))
            except Exception as err:
                responses.append(self._error(err))
        return responses

    def finalize(self):
        self.session = None
