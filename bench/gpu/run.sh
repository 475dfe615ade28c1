#!/usr/bin/env bash
# The GPU benchmark as one command on a machine with an NVIDIA GPU: a virtual environment resolved from the lock
# (the `train` extra: torch 2.14.1's CUDA build, timm), onnxruntime swapped for onnxruntime-gpu (the same module:
# never both), then bench/gpu/encoder_gpu.py under a hard limit (8 minutes; the script itself stops starting new
# steps after --budget-s, 420 s by default, so its table is printed before the limit).
#
#   bash bench/gpu/run.sh [encoder_gpu.py options]
#   WHEELS=/path/to/wheels bash bench/gpu/run.sh    # no package index: install from a folder of wheels
#   VENV=/opt/mstar-gpu LIMIT_S=600 bash bench/gpu/run.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
venv=${VENV:-$root/.venv-gpu}
limit=${LIMIT_S:-480}
pip_args=(--quiet --disable-pip-version-check -c constraints.txt -c requirements/lock.txt -c requirements/gpu-pins.txt)
if [ -n "${WHEELS:-}" ]; then
  pip_args+=(--no-index --find-links "$WHEELS")
fi
started=$(date +%s)
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install "${pip_args[@]}" -e '.[train]'
"$venv/bin/python" -m pip uninstall --quiet -y onnxruntime
"$venv/bin/python" -m pip install "${pip_args[@]}" --no-deps onnxruntime-gpu
echo "install: $(($(date +%s) - started)) s"
exec timeout --signal=INT --kill-after=20 "$limit" "$venv/bin/python" bench/gpu/encoder_gpu.py "$@"
