"""In-process inference: the pipeline and its pluggable runners."""
