# syntax=docker/dockerfile:1.7
# GPU worker: the `gpu` extra (onnxruntime-gpu, CUDA + TensorRT execution providers in-process) on the NVIDIA CUDA
# runtime + cuDNN base that onnxruntime-gpu 1.31 is built for (CUDA 13, cuDNN 9). The CPU onnxruntime build is
# never installed beside it (same module; the build fails if both are there). No torch.
#   docker build -f docker/worker-gpu.Dockerfile -t mstar-worker-gpu .
# Runs with `--gpus all` (compose: deploy.resources.reservations.devices; Kubernetes: nvidia.com/gpu).
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu22.04

FROM ${CUDA_IMAGE} AS base
# Python 3.11 from the Ubuntu 22.04 archive (the project pins Python 3.11); the CUDA base pins the rest.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/*

FROM base AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY requirements/lock.txt requirements/lock.txt
COPY service ./service
COPY training/__init__.py training/cli.py ./training/
COPY docker/assert_dists.py docker/assert_dists.py
RUN pip install --no-compile -c constraints.txt -c requirements/lock.txt '.[gpu,worker,triton,pacs,s3]' \
    && pip check \
    && python docker/assert_dists.py --absent torch onnxruntime --present onnxruntime-gpu celery

FROM base AS runtime
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    MSTAR_DATA_DIR=/data MSTAR_BUNDLE_DIR=/models MSTAR_ORT_DEVICE=cuda NUMBA_CACHE_DIR=/tmp/numba-cache \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
RUN useradd --system --uid 10001 --gid 0 --create-home --home-dir /home/mstar mstar \
    && mkdir -p /data /models \
    && chown 10001:0 /data && chmod 2775 /data
COPY --from=build /opt/venv /opt/venv
COPY docker/healthcheck.py /usr/local/bin/mstar-healthcheck
USER 10001
WORKDIR /home/mstar
VOLUME ["/data"]
HEALTHCHECK --interval=30s --timeout=15s --start-period=90s --retries=3 \
    CMD ["python", "/usr/local/bin/mstar-healthcheck", "celery"]
# solo pool: one process owns the GPU session (docs/workers.md); scale with replicas, not concurrency
CMD ["mstar", "worker", "--queues", "interactive,batch", "--pool", "solo", "--name", "mstar@%h"]
