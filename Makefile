# Two commands on a fresh machine:  `make demo` (set up + run the main job)  and  `make test-all`
# (the tests CI runs; `make test` is the few-minute lane).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: venv demo test test-all test-fast test-slow bench perf-analyzer gpu-wheels lint clean

venv: $(VENV)/.installed $(VENV)/.perf_analyzer

# The CPU build of torch goes in first: a looser requirement would pull a CUDA build of several GB.
# numpy < 2: the Triton Python backend sees empty tensors with numpy 2.
$(VENV)/.installed: pyproject.toml
	@echo "[setup] creating $(VENV) (torch $(TORCH_VERSION) CPU build first)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install -q -e ".[export,serving,dev,data,eval]"
	@touch $@

# NVIDIA's perf_analyzer, the second opinion on the served numbers (benchmarks.perf_analyzer_compare)
perf-analyzer: $(VENV)/.perf_analyzer
$(VENV)/.perf_analyzer: benchmarks/install_perf_analyzer.sh | $(VENV)/.installed
	VENV=$(VENV) bash benchmarks/install_perf_analyzer.sh
	@touch $@

demo: venv
	$(BIN)/python -m pigeon.demo --out demo

# The lane to run before a commit (about 3-4 minutes here): unit tests and one real-server smoke test.
test: venv
	$(BIN)/python -m pytest -m "(not slow and not gpu and not trt and not triton and not integration) or smoke" -q

# What CI runs (.ci/run), about 45 minutes here: every test that needs no GPU and is not `slow`.
test-all: venv
	$(BIN)/python -m pytest -m "not slow and not gpu and not trt" -q

# Everything but the real tritonserver and the slow runs.
test-fast: venv
	$(BIN)/python -m pytest -m "not slow and not gpu and not trt and not triton" -q

test-slow: venv
	$(BIN)/python -m pytest -m "slow" -q

bench: venv
	$(BIN)/python -m benchmarks.generate --preset tiny

# What benchmarks/gpu_check.sh needs on a lent GPU machine that its image lacks (it has no network).
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 -d .whl \
		"diffusers>=0.35,<0.50" importlib_metadata "transformers>=5.24,<6"

lint: venv
	$(BIN)/python -m ruff check pigeon tests benchmarks

clean:
	rm -rf demo .pytest_cache
