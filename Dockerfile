# Pigeon on NVIDIA Triton, GPU target: TensorRT engines built on the serving GPU at start-up.
#
#   pigeon export all --checkpoint runs/small --repository triton_models --version 1 --target gpu
#   docker build -t pigeon-triton .
#   docker run --gpus all -p 8000:8000 -p 8001:8001 -p 8002:8002 \
#       -v $PWD/triton_models/gpu:/models pigeon-triton
#
# The tag matches the Triton (2.51) that the CPU target's nvidia-pytriton wheel bundles, so both
# targets serve the same model configuration schema.
FROM nvcr.io/nvidia/tritonserver:24.10-py3

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 PIGEON_VERSION=1 PIGEON_PRECISION=fp16
WORKDIR /opt/pigeon
COPY pyproject.toml README.md ./
COPY pigeon ./pigeon
# The Python-backend models import no torch: install the package without its training dependencies,
# plus what serving and the engine build need (numpy < 2 for the Python backend; TensorRT's Python
# API matching the container's TensorRT 10.5).
RUN pip install --no-deps . \
 && pip install "numpy<2" pillow tokenizers safetensors onnx onnxruntime "tensorrt-cu12==10.5.*"
COPY docker/entrypoint.sh /usr/local/bin/pigeon-entrypoint
RUN chmod +x /usr/local/bin/pigeon-entrypoint

EXPOSE 8000 8001 8002
HEALTHCHECK --interval=10s --timeout=3s --start-period=600s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8000/v2/health/ready || exit 1
ENTRYPOINT ["pigeon-entrypoint"]
