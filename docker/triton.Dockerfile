# Triton Inference Server with the onnxruntime backend, for GPU nodes. The model repository written by
# `mstar export` is mounted at /models; configs pin versions, so nothing is loaded implicitly.
ARG TRITON_TAG=24.08-py3
FROM nvcr.io/nvidia/tritonserver:${TRITON_TAG}
CMD ["tritonserver", "--model-repository=/models", "--model-control-mode=none", "--strict-readiness=true", \
     "--exit-timeout-secs=30", "--allow-metrics=true"]
