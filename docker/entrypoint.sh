#!/usr/bin/env bash
# Build (or reuse from the cache) the TensorRT engines of version $PIGEON_VERSION on this GPU, then
# serve every model. Binds 0.0.0.0 inside the container; expose it only behind an authenticating proxy.
set -euo pipefail
REPO=${PIGEON_REPOSITORY:-/models}
python3 -m pigeon.cli export tensorrt --repository "$REPO" --version "$PIGEON_VERSION" \
    --precision "$PIGEON_PRECISION"
exec tritonserver --model-repository="$REPO" --model-control-mode=explicit --load-model='*' \
    --cache-config=local,size=268435456 --strict-readiness=true --exit-timeout-secs=30 "$@"
