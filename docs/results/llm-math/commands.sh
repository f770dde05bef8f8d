#!/bin/bash
# SmolLM2 on the shared math set, the paper's generative protocol (greedy), first 50 of AddSub and MultiArith
set -x
COMMON="--tasks AddSub MultiArith --eval-limit 50 --dtype float32 --greedy"
.venv/bin/python -m experiments.finetune --preset smollm2-math-lora-r8 --zero-shot $COMMON --out runs/math/zero-shot
.venv/bin/python -m experiments.finetune --preset smollm2-math-lora-r8 --steps 100 $COMMON --out runs/math/lora-r8
.venv/bin/python -m experiments.finetune --preset smollm2-math-genlora-r8g16 --steps 100 $COMMON --out runs/math/genlora-r8g16
