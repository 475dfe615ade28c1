#!/usr/bin/env bash
# Starts tritonserver on the bundle's model repository. Refuses to start on an empty or unfinished bundle with one
# clear line (a fresh clone has no weights until the init service has written them), instead of serving nothing.
#   TRITON_MODEL_CONFIG=cpu   use each model's configs/cpu.pbtxt (hosts without a GPU); empty = config.pbtxt (GPU)
#   extra arguments are passed to tritonserver
set -euo pipefail
repo=${MSTAR_MODEL_REPOSITORY:-/models}
if [[ ! -f "$repo/bundle.json" ]]; then
  echo "error [bundle_missing]: $repo/bundle.json not found; run the bundle init first (deploy/README.md)" >&2
  exit 2
fi
missing=$(find "$repo" -mindepth 1 -maxdepth 1 -type d -exec test -f '{}/config.pbtxt' ';' -print \
  | while read -r m; do [[ -n "$(find "$m" -mindepth 2 -name 'model.onnx' -print -quit)" ]] || basename "$m"; done)
if [[ -n "$missing" ]]; then
  echo "error [bundle_incomplete]: no model.onnx for: $(echo "$missing" | tr '\n' ' ')in $repo" >&2
  exit 2
fi
args=(--model-repository="$repo" --model-control-mode=none --strict-readiness=true --exit-timeout-secs=30
  --allow-metrics=true --allow-gpu-metrics=true --metrics-port=8002)
if [[ -n "${TRITON_MODEL_CONFIG:-}" ]]; then
  args+=(--model-config-name="$TRITON_MODEL_CONFIG")
fi
exec tritonserver "${args[@]}" "$@"
