"""Observability shared by the gateway and the workers: log context and JSON logs (`logs`), worker-side Prometheus
metrics (`worker_metrics`) and OpenTelemetry tracing (`tracing`). Nothing here imports FastAPI or Celery at module
level, so every process type can use it."""
