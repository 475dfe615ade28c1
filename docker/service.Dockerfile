# syntax=docker/dockerfile:1.7
# Gateway and CPU worker: numpy + onnxruntime (CPU) + tritonclient, never torch. Build from the repository root:
#   docker build -f docker/service.Dockerfile --target gateway -t mstar-gateway .
#   docker build -f docker/service.Dockerfile --target worker  -t mstar-worker .
# Every Python dependency is pinned by requirements/lock.txt; the base image by its full tag.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY requirements/lock.txt requirements/lock.txt
COPY service ./service
# only the CLI plugin hook: training's commands then say "torch not installed" instead of vanishing
COPY training/__init__.py training/cli.py ./training/
COPY docker/assert_dists.py docker/assert_dists.py
RUN pip install --no-compile -c constraints.txt -c requirements/lock.txt '.[serve,worker,triton,pacs,s3]' \
    && pip check \
    && python docker/assert_dists.py --absent torch onnxruntime-gpu --present onnxruntime celery tritonclient

FROM ${PYTHON_IMAGE} AS runtime
# NUMBA_CACHE_DIR: the patch-resize kernels (service/slides/jit.py) compile once per container into a path any
# uid can write, and every Celery child process loads them from there
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    MSTAR_DATA_DIR=/data MSTAR_BUNDLE_DIR=/models NUMBA_CACHE_DIR=/tmp/numba-cache
# uid 10001, group 0: also runs under OpenShift-style random uids (group-writable /data)
RUN useradd --system --uid 10001 --gid 0 --create-home --home-dir /home/mstar mstar \
    && mkdir -p /data /models \
    && chown 10001:0 /data && chmod 2775 /data
COPY --from=build /opt/venv /opt/venv
COPY docker/healthcheck.py /usr/local/bin/mstar-healthcheck
# bundle init without torch: verify or import an exported bundle (training the demo needs mstar-train)
COPY docker/bundle-init.sh /usr/local/bin/mstar-bundle-init
USER 10001
WORKDIR /home/mstar
VOLUME ["/data"]

FROM runtime AS worker
# Celery node name mstar@<hostname>: the health check pings exactly this worker through the broker.
HEALTHCHECK --interval=30s --timeout=15s --start-period=60s --retries=3 \
    CMD ["python", "/usr/local/bin/mstar-healthcheck", "celery"]
CMD ["mstar", "worker", "--queues", "interactive,batch", "--concurrency", "2", "--name", "mstar@%h"]

# last stage = the default target (gateway)
FROM runtime AS gateway
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "/usr/local/bin/mstar-healthcheck", "http", "http://127.0.0.1:8000/healthz"]
CMD ["mstar", "serve", "--host", "0.0.0.0", "--port", "8000"]
