"""Torch-free logic shared by the in-process pipeline and the Triton Python-backend models:
image decoding, request validation, token masking, prompt assembly and decoding."""
