"""What each memory lever saves in a SmolLM2 training step, by XLA's own account.

    python -m benchmarks.step_memory [--out FILE]

Compiles the GenLoRA r=8 G=16 (q/k/v) training step of `experiments.train`
on SmolLM2-135M at batch 8 × 128 for each combination below and reads
``compiled.memory_analysis()``: the base arguments and the temporaries XLA
allocates for the step. Nothing runs, so the figures are exact and do not
depend on the machine's load; they are what an accelerator would allocate
for the same program (CPU figures here).

- base: ``float`` (dequantized to float32) or ``q4`` (the file's Q4_1/Q8_0
  blocks kept, `genlora_jax.models.load_gguf(quantized=True)`);
- loss: the whole (B, L, V) logits, 128-token chunks
  (``experiments.finetune.causal_lm_loss(chunk=128)``, each chunk's logits
  recomputed in the backward pass; ``--fused``: its gradient taken in the
  forward scan instead) or 6,144-word slices of the vocabulary
  (``causal_lm_loss(vocab_rows=6144)``, ``--lean``'s loss);
- remat: decoder layers under `nn.remat` (`genlora_jax.models.remat_llama`),
  all of them or (``--remat-curve``) the first n;
- scheduler: XLA's default CPU scheduler or its memory-minimising one
  (`experiments.train.MEMORY_SCHEDULER_FLAG`). The flag is read when JAX
  starts, so each scheduler runs in its own child process.

``--remat-curve 0,10,20,30`` compiles instead the lean 4-bit step
(q4, the loss by vocabulary slices, or with ``--fused`` the fused 128-token
chunks, memory scheduler) with the first n layers rematerialised,
for each n, beside the float reference: the memory side of the time/memory
trade that ``--remat-layers`` (`experiments.llm`) offers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from benchmarks._timing import report
from benchmarks.isolated import STEP_BATCH
from experiments.cli import markdown_table
from experiments.finetune import LEAN_LOSS_CHUNK, LEAN_VOCAB_ROWS

# (base, loss chunk, remat: False, True for every layer, or a count of layers
#  [, fused, vocabulary rows per slice])
CONFIGS = [
    ("float", 0, False),
    ("float", LEAN_LOSS_CHUNK, False),
    ("float", LEAN_LOSS_CHUNK, True),
    ("q4", 0, False),
    ("q4", LEAN_LOSS_CHUNK, True),
    ("q4", 0, True, False, LEAN_VOCAB_ROWS),  # --lean
]
SCHEDULERS = ("default", "memory")


def step_memory(
    base_format: str, chunk: int, remat: bool | int, fused: bool = False, vocab_rows: int = 0
) -> dict:
    """XLA's MiB for the step (base arguments, other arguments, temporaries)
    and its GFLOP (``cost_analysis``)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import genlora_jax as gl
    from experiments.finetune import causal_lm_loss
    from experiments.train import make_step
    from genlora_jax.models import load_gguf

    model, base, _ = load_gguf("smollm2", quantized=base_format == "q4", remat=remat)
    params = gl.wrap(base, ["q_proj", "k_proj", "v_proj"], gl.GenLoRAConfig(rank=8, groups=16))
    base, adapters = gl.split(params)
    tx = gl.optimizer(optax.adamw(1e-4))
    ids = np.random.default_rng(0).integers(100, 40000, STEP_BATCH["smollm2"]).astype(np.int32)
    ids = jnp.asarray(ids)
    mask = jnp.ones_like(ids)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids, "loss_mask": mask}
    step = make_step(causal_lm_loss(model, chunk=chunk, fused=fused, vocab_rows=vocab_rows), tx)
    compiled = step.lower(adapters, tx.init(adapters), base, batch, None).compile()
    memory = compiled.memory_analysis()
    mib = 2**20
    # XLA counts each argument; a tied head and its table share one buffer,
    # counted once here (`gl.quant.nbytes`)
    leaves_mib = sum(x.nbytes for x in jax.tree.leaves(base)) / mib
    return {
        "base": base_format,
        "chunk": chunk,
        "remat": remat,
        "fused": fused,
        "vocab_rows": vocab_rows,
        "gflops": compiled.cost_analysis()["flops"] / 1e9,
        "base_mib": gl.quant.nbytes(base) / mib,
        "other_args_mib": memory.argument_size_in_bytes / mib - leaves_mib,
        "temp_mib": memory.temp_size_in_bytes / mib,
    }


def run_scheduler(scheduler: str, configs: list[tuple] = CONFIGS) -> list[dict]:
    """Every config in one child process started with ``scheduler``'s XLA flags."""
    from experiments.train import MEMORY_SCHEDULER_FLAG

    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "").replace(MEMORY_SCHEDULER_FLAG, "")
    if scheduler == "memory":
        flags = f"{flags} {MEMORY_SCHEDULER_FLAG}"
    env["XLA_FLAGS"] = flags.strip()
    cmd = [sys.executable, "-m", "benchmarks.step_memory", "--child", json.dumps(configs)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"the {scheduler} scheduler's child failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return [{**row, "scheduler": scheduler} for row in rows]


def render(rows: list[dict], command: str) -> str:
    """Markdown: one row per config and scheduler, and each total against the
    float whole-logits step under the default scheduler."""
    reference = next(
        r
        for r in rows
        if (r["base"], r["chunk"], r["remat"], r["scheduler"]) == (*CONFIGS[0], "default")
    )

    def total(r):
        return r["base_mib"] + r["other_args_mib"] + r["temp_mib"]

    table = [
        [
            r["base"],
            _loss_label(r),
            _remat_label(r["remat"]),
            r["scheduler"],
            f"{r['base_mib']:,.0f}",
            f"{r['temp_mib']:,.0f}",
            f"{total(r):,.0f}",
            f"{total(r) / total(reference):.3f}",
            f"{r['gflops']:,.0f}" if "gflops" in r else "–",
        ]
        for r in rows
    ]
    header = ["base", "loss", "remat", "scheduler", "base MiB", "temporaries MiB"]
    header += ["step MiB", "/ float, whole, default", "GFLOP"]
    return "\n".join(
        [
            f"- command: `{command}`",
            "- SmolLM2-135M, GenLoRA r=8 G=16 on q/k/v, batch 8 × 128, AdamW step of "
            "`experiments.train.make_step`; XLA `memory_analysis()` of the compiled step",
            "",
            markdown_table(header, "llllrrrrr", table),
        ]
    )


def _loss_label(row: dict) -> str:
    if row.get("vocab_rows"):
        return f"{row['vocab_rows']}-word vocabulary slices"
    if not row["chunk"]:
        return "whole"
    return f"{row['chunk']}-token chunks" + (", fused" if row.get("fused") else "")


def _remat_label(remat: bool | int) -> str:
    if remat is True:
        return "yes"
    return "no" if remat is False or remat == 0 else f"first {remat}"


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="also write the table here")
    parser.add_argument(
        "--remat-curve",
        type=lambda text: [int(n) for n in text.split(",")],
        default=None,
        metavar="N,N,...",
        help="the lean q4 step with the first N layers rematerialised, for each N",
    )
    parser.add_argument(
        "--fused",
        action="store_true",
        help="with --remat-curve: 128-token chunks, each one's gradient taken in the forward "
        "scan (instead of the lean loss's vocabulary slices)",
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fused and not args.remat_curve:
        parser.error("--fused applies to --remat-curve only; add --remat-curve N,... or drop it.")
    if args.child:
        for config in json.loads(args.child):
            print(json.dumps(step_memory(*config)), flush=True)
        return ""
    if args.remat_curve:
        if args.fused:
            curve = [("q4", LEAN_LOSS_CHUNK, n, True) for n in args.remat_curve]
        else:
            curve = [("q4", 0, n, False, LEAN_VOCAB_ROWS) for n in args.remat_curve]
        rows = run_scheduler("default", CONFIGS[:1]) + run_scheduler("memory", curve)
    else:
        rows = [row for scheduler in SCHEDULERS for row in run_scheduler(scheduler)]
    parts = ["python -m benchmarks.step_memory"]
    if args.remat_curve:
        parts += ["--remat-curve", ",".join(map(str, args.remat_curve))]
    parts += ["--fused"] if args.fused else []
    parts += ["--out", args.out] if args.out else []
    command = " ".join(parts)
    return report(render(rows, command), args.out)


if __name__ == "__main__":
    main()
