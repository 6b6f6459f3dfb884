"""Export: checkpoint -> validated ONNX per component -> TensorRT engines -> a published model version.

    pigeon export onnx --checkpoint runs/tiny --out artifacts/tiny [--precision fp16] [--fused-attention]
    pigeon export tensorrt --artifacts artifacts/tiny [--precision fp16]      (needs TensorRT and a GPU)
    pigeon export all --checkpoint runs/tiny --repository triton_models --version 2

Installed with the package (not a loose `export/` folder) so `pigeon export` works from any directory and
inside the serving container.
"""
