# Two commands on a fresh machine:  `make demo` (set up + run the main job)  and  `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= demo/out
TORCH_VERSION ?= 2.13.0

.PHONY: venv demo test test-slow bench lint clean

venv: $(VENV)/.installed

# The CPU build of torch goes in first: a looser requirement would pull a CUDA build of several GB.
# numpy < 2: the Triton Python backend sees empty tensors with numpy 2.
$(VENV)/.installed: pyproject.toml
	@echo "[setup] creating $(VENV) (torch $(TORCH_VERSION) CPU build first)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install -q -e ".[export,serving,dev]"
	@touch $@

demo: venv
	@echo "[demo 1/3] random tiny checkpoint -> $(OUT)/checkpoint"
	$(BIN)/pigeon init --preset tiny --out $(OUT)/checkpoint --overwrite
	@echo "[demo 2/3] procedural users -> $(OUT)/users"
	$(BIN)/pigeon data procedural --out $(OUT)/users --users 1 --size 32
	@echo "[demo 3/3] personalized generation -> $(OUT)/generated.png"
	$(BIN)/pigeon generate --checkpoint $(OUT)/checkpoint \
	    --history $(OUT)/users/user0/history_*.png --reference $(OUT)/users/user0/reference.png \
	    --text "$$(cat $(OUT)/users/user0/text.txt)" --out $(OUT)/generated.png

test: venv
	$(BIN)/python -m pytest -m "not slow and not gpu and not trt" -q

test-slow: venv
	$(BIN)/python -m pytest -m "slow" -q

bench: venv
	$(BIN)/python -m benchmarks.generate --preset tiny

lint: venv
	$(BIN)/python -m ruff check pigeon tests benchmarks

clean:
	rm -rf $(OUT) .pytest_cache
