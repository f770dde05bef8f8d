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

import os
import platform

import jax
import optax

import genlora_jax as gl
from benchmarks._timing import interleaved_medians, report
from benchmarks.core import TARGETS, load_model, make_batch, timed_step, timing_args
from experiments.presets import METHODS as NAMED_METHODS


def method_config(name: str) -> gl.methods.AdapterConfig:
    """The config of a name of `experiments.presets.METHODS`, without dropout."""
    method, fields = NAMED_METHODS[name]
    return gl.methods.config(method, **fields)


METHODS = {
    "LoRA r=8": method_config("lora-r8"),
    "GenLoRA r=8 G=16": method_config("genlora-r8g16"),
    "DoRA r=8": method_config("dora-r8"),
    "HiRA r=8": method_config("hira-r8"),
    "MELoRA r=8 k=4": method_config("melora-r8m4"),
    "AuroRA r=8": method_config("aurora-r8"),
    "LoRAN r=8": method_config("loran-r8"),
}
"""Row label → config (rank 8; no dropout: a timing needs no regularisation)."""


def main(argv=None) -> str:
    args = timing_args(argv, description=__doc__.splitlines()[0])
    model = load_model()
    batch = make_batch(args.batch, args.seq)
    tx = gl.optimizer(optax.adamw(1e-3))
    thunks, compiles, counts = {}, {}, {}
    for name, config in METHODS.items():
        params = gl.wrap(model.params, TARGETS, config, extra_trainable=["classifier"])
        counts[name] = gl.count_params(params).trainable
        thunks[name], compiles[name] = timed_step(model, params, batch, tx)

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
