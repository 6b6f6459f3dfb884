"""Triton Inference Server: the model repository's configs (`triton_config`, `repository`), the Python
backend's models (`triton_backend`), the server process (`server`) and the client (`client`). The
torch-free NumPy pieces they share with the in-process pipeline live in `pigeon.core`."""
