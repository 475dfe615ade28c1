# Training/export image (torch, timm, transformers). On GPU nodes use a CUDA base and the matching torch build.
FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update && apt-get install -y --no-install-recommends default-jre-headless \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY service ./service
COPY training ./training
RUN pip install -c constraints.txt '.[train]'
ENTRYPOINT ["mstar"]
CMD ["--help"]
