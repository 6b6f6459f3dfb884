"""Torch-free NumPy pieces of the method, below the models so that everything can import them: image
decoding and checks (`images`), token masking (`masking`), prompt assembly (`prompt`), token
decoding (`decoding`) and a request's deadline between loop steps (`deadline`). The in-process
pipeline, training and the Triton Python backend (whose environment has NumPy and no torch) run the
same code."""
