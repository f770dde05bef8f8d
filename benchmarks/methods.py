"""Train-step time of every adapter method relative to LoRA r = 8, in one process.

    python -m benchmarks.methods [--repeats 10] [--out BENCHMARKS-methods.md]

Real MiniLM-L6 (BERT), batch 32 × 64 random tokens, targets query/key/value,
rank 8 for every method (MELoRA: 4 minis of rank 2), classifier head trained
too. Each method gets the same jitted AdamW step that differentiates only the
adapter half of the tree; steps run interleaved round-robin after warm-up
(compilation excluded) and each method's median is divided by LoRA's.

HiRA and LoRAN form an m × n matrix per adapted module, and their backward
pass needs the m × n gradient of ΔW (Σ_t g_t x_tᵀ), which LoRA never forms:
that is where their extra time goes.
"""

from __future__ import annotations

import argparse
import os
import platform

import jax
import optax

import genlora_jax as gl
from benchmarks._timing import compile_seconds, interleaved_medians, report
from benchmarks.core import TARGETS, adapter_step, load_model, make_batch
from experiments.cli import positive_int

METHODS = {
    "LoRA r=8": gl.LoRAConfig(rank=8),
    "GenLoRA r=8 G=16": gl.GenLoRAConfig(rank=8, groups=16),
    "DoRA r=8": gl.DoRAConfig(rank=8),
    "HiRA r=8": gl.HiRAConfig(rank=8),
    "MELoRA r=8 k=4": gl.MELoRAConfig(rank=8, mini=4),
    "AuroRA r=8": gl.AuroRAConfig(rank=8),
    "LoRAN r=8": gl.LoRANConfig(rank=8),
}


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=positive_int, default=10)
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--seq", type=positive_int, default=64)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    model = load_model()
    batch = make_batch(args.batch, args.seq)
    tx = gl.optimizer(optax.adamw(1e-3))
    thunks, compiles, counts = {}, {}, {}
    for name, config in METHODS.items():
        params = gl.wrap(model.params, TARGETS, config, extra_trainable=["classifier"])
        counts[name] = gl.count_params(params).trainable
        base, adapters = gl.split(params)
        step, state = adapter_step(model, tx), tx.init(adapters)
        compiles[name] = compile_seconds(step, adapters, state, base, batch)
        thunks[name] = lambda s=step, a=adapters, o=state, b=base: s(a, o, b, batch)

    medians = interleaved_medians(thunks, repeats=args.repeats)
    lora = medians["LoRA r=8"]
    lines = [
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}; MiniLM-L6, batch "
        f"{args.batch} x {args.seq}, q/k/v + classifier; median of {args.repeats} "
        "interleaved repeats after 2 warm-up rounds",
        "",
        "| method | trainable | step ms (median) | vs LoRA r=8 | compile s |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, sec in medians.items():
        lines.append(
            f"| {name} | {counts[name]:,} | {1000 * sec:.1f} | {sec / lora:.3f} "
            f"| {compiles[name]:.1f} |"
        )
    return report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
