# syntax=docker/dockerfile:1.7
# Trainer / exporter (torch 2.14.1 CUDA build from PyPI with its nvidia-* CUDA 13 wheels: needs only the host
# driver, and also runs on CPU), and the one-shot bundle init of the compose stack and the Helm chart:
#   docker build -f docker/train.Dockerfile -t mstar-train .
#   docker run --gpus all -v $PWD/runs:/work mstar-train train stage1 --config ...
#   docker run -v bundle:/models mstar-train-image mstar-bundle-init      (see docker/bundle-init.sh)
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY requirements/lock.txt requirements/lock.txt
COPY service ./service
COPY training ./training
COPY docker/assert_dists.py docker/assert_dists.py
RUN pip install --no-compile -c constraints.txt -c requirements/lock.txt '.[train]' \
    && pip check \
    && python docker/assert_dists.py --absent onnxruntime-gpu --present torch onnxruntime

FROM ${PYTHON_IMAGE} AS runtime
# Java for the report metrics (pycocoevalcap METEOR/SPICE); from the pinned Debian release of the base image.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends default-jre-headless \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --gid 0 --create-home --home-dir /home/mstar mstar \
    && mkdir -p /work /models && chown 10001:0 /work /models && chmod 2775 /work /models
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 \
    MSTAR_BUNDLE_DIR=/models NUMBA_CACHE_DIR=/tmp/numba-cache
COPY --from=build /opt/venv /opt/venv
COPY docker/bundle-init.sh /usr/local/bin/mstar-bundle-init
USER 10001
WORKDIR /work
# A batch job, not a server: there is nothing to probe while it runs.
HEALTHCHECK NONE
ENTRYPOINT ["mstar"]
CMD ["--help"]
