#!/usr/bin/env bash
# GPU check for a lent H100/H200 (under 8 minutes): time, check parity, export, validate, TensorRT.
#   bash benchmarks/gpu_check.sh [CHECKPOINT [gpu_check options]]   # default: checkpoints/small
# The lent machine has torch, peft, onnx and onnxruntime, an older transformers (5.17, before the
# decoder `cache=` API) and no diffusers, and no network: carry diffusers, importlib_metadata and
# transformers as wheels in .whl/ (`make gpu-wheels` downloads them; the device tool's README says
# how they travel) and this script installs them first.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 - <<'PY'
import importlib.util, onnxruntime, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "| onnxruntime", onnxruntime.__version__,
      onnxruntime.get_available_providers(), "| tensorrt:",
      "present" if importlib.util.find_spec("tensorrt") else "absent")
PY
timeout 450 python3 -m benchmarks.gpu_check --checkpoint "${1:-checkpoints/small}" "${@:2}"
