#!/usr/bin/env bash
# GPU check for a lent H100/H200 (under 8 minutes): export, TensorRT where present, validate, time.
# The lent machine has torch, onnx and onnxruntime but no diffusers/peft and no network: carry them as
# wheels in .whl/ (see the device tool's README) and this script installs them first.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
timeout 450 python3 -m benchmarks.gpu_check --preset "${1:-small}"
