"""The record of one timing run: the float step against the lean 4-bit step
with the loss cut by positions (128-token chunks) and by the vocabulary
(6,144-word slices), three steps built in one process and called in turn,
the order reversed every other block, under XLA's memory scheduler (all
three; the lean steps need it). Output: ``lean_loss_timing.log``.

    USE_TORCH=0 XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false \\
        PYTHONPATH=. python docs/results/bench-2026-12-02-evening/lean_loss_timing.py 10
"""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import genlora_jax as gl
from benchmarks.isolated import _smollm2_batch
from benchmarks.methods import method_config
from experiments.finetune import causal_lm_loss
from experiments.train import make_step
from genlora_jax.models import load_gguf


def build(quantized, remat, **loss):
    model, base, _ = load_gguf("smollm2", dtype=jnp.float32, quantized=quantized, remat=remat)
    params = gl.wrap(base, ["q_proj", "k_proj", "v_proj"], method_config("genlora-r8g16"))
    base, adapters = gl.split(params)
    tx = gl.optimizer(optax.adamw(1e-4))
    ids, mask = (jnp.asarray(x) for x in _smollm2_batch())
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids, "loss_mask": mask}
    step = make_step(causal_lm_loss(model, **loss), tx)
    state = tx.init(adapters)
    start = time.perf_counter()
    compiled = step.lower(adapters, state, base, batch, None).compile()
    compile_s = time.perf_counter() - start

    def call():
        start = time.perf_counter()
        jax.block_until_ready(compiled(adapters, state, base, batch, None))
        return time.perf_counter() - start

    call(), call()
    return call, compile_s


steps = {
    "float": build(False, False),
    "q4-chunk128": build(True, True, chunk=128),
    "q4-vocab6144": build(True, True, vocab_rows=6144),
}
print({k: round(v[1], 1) for k, v in steps.items()}, flush=True)
names = list(steps)
times = {k: [] for k in names}
for block in range(int(sys.argv[1])):
    for k in names if block % 2 == 0 else names[::-1]:
        times[k].append(steps[k][0]())
    print(block, {k: round(v[-1], 3) for k, v in times.items()}, flush=True)
med = {k: float(np.median(v)) for k, v in times.items()}
print("median", med)
print("ratios to float", {k: round(med[k] / med["float"], 3) for k in names})
