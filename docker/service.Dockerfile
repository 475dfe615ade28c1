# Gateway and CPU/Triton-client worker image: numpy + onnxruntime + tritonclient, never torch.
# Build from the repository root:  docker build -f docker/service.Dockerfile -t mstar-service .
FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN useradd --create-home --uid 10001 mstar
WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY service ./service
COPY training/__init__.py training/cli.py ./training/
RUN pip install -c constraints.txt '.[serve,worker,triton,pacs,s3]'
USER mstar
ENV MSTAR_DATA_DIR=/data MSTAR_BUNDLE_DIR=/models
VOLUME ["/data"]
EXPOSE 8000
# The same image runs the gateway (default) or a Celery worker (`mstar worker`).
CMD ["mstar", "serve", "--host", "0.0.0.0", "--port", "8000"]
