# syntax=docker/dockerfile:1.7
# Triton Inference Server (the official NGC image: onnxruntime backend with CUDA + TensorRT) plus our launcher.
# The model repository is the bundle volume written by the one-shot init service (deploy/README.md), mounted
# read-only at /models; TensorRT engines are cached on a separate writable volume at /trt-cache, outside the
# repository, so Triton never mistakes the cache for a model and engines survive restarts.
#   docker build -f docker/triton.Dockerfile -t mstar-triton .
# 25.10 = Triton 2.62 on CUDA 13.0, the CUDA major of the gpu extra's onnxruntime-gpu.
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:25.10-py3
FROM ${TRITON_IMAGE}
COPY docker/triton-entrypoint.sh /usr/local/bin/mstar-triton
COPY docker/healthcheck.py /usr/local/bin/mstar-healthcheck
# triton-server (uid 1000) is the image's own non-root user
RUN mkdir -p /trt-cache && chown 1000:1000 /trt-cache
USER 1000
ENV MSTAR_MODEL_REPOSITORY=/models TRITON_MODEL_CONFIG=""
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "/usr/local/bin/mstar-healthcheck", "http", "http://127.0.0.1:8000/v2/health/ready"]
ENTRYPOINT ["/usr/local/bin/mstar-triton"]
