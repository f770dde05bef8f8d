"""Core benchmark of issue 2: ratios measured side by side in one process.

    python -m benchmarks.core [--repeats 10] [--out BENCHMARKS-core.md]

Real MiniLM-L6 (BERT), batch 32 × 64 tokens, targets query/key/value, r = 8,
jitted train steps (AdamW), medians of interleaved repeats after warm-up:

- GenLoRA step / LoRA step (target ≤ 1.02);
- full-tree step (`optax.multi_transform` over base + adapters, gradients of
  the whole tree) / step differentiating only the adapter half (≤ 1.02);
- merged-model forward / base-model forward (≤ 1.01).
"""

from __future__ import annotations

import argparse
import os
import platform
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

import genlora_jax as gl
from benchmarks._timing import compile_seconds, interleaved_medians, report
from experiments.cli import positive_int
from experiments.models import attention_targets, minilm_path

TARGETS = attention_targets("bert")


def load_model():
    """The pretrained MiniLM-L6 (BERT) with a two-label head."""
    from transformers import FlaxBertForSequenceClassification

    return FlaxBertForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)


def make_batch(batch: int, seq: int):
    key = jax.random.key(0)
    return {
        "input_ids": jax.random.randint(key, (batch, seq), 1000, 20000),
        "attention_mask": jnp.ones((batch, seq), jnp.int32),
        "labels": jax.random.randint(key, (batch,), 0, 2),
    }


def loss_of(model):
    def loss_fn(params, batch):
        logits = gl.apply(model, params, batch["input_ids"], batch["attention_mask"]).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

    return loss_fn


def adapter_step(model, tx):
    """Differentiates and updates only the adapter half of the tree."""
    loss_fn = loss_of(model)

    @jax.jit
    def step(adapters, opt_state, base, batch):
        loss, grads = jax.value_and_grad(lambda a: loss_fn(gl.join(base, a), batch))(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    return step


def full_tree_step(model, tx):
    """Differentiates the whole tree; `multi_transform` zeroes the frozen part."""
    loss_fn = loss_of(model)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def timing_args(argv, description: str | None = None) -> argparse.Namespace:
    """The flags every timing script shares: --repeats, --batch, --seq, --out."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--repeats", type=positive_int, default=10)
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--seq", type=positive_int, default=64)
    parser.add_argument("--out", default=None)
    return parser.parse_args(argv)


def timed_step(model, params, batch, tx) -> tuple[Callable[[], object], float]:
    """``(thunk, compile seconds)`` of the jitted `adapter_step` on wrapped ``params``."""
    base, adapters = gl.split(params)
    step, state = adapter_step(model, tx), tx.init(adapters)
    compiled = compile_seconds(step, adapters, state, base, batch)
    return (lambda: step(adapters, state, base, batch)), compiled


def main(argv=None) -> str:
    args = timing_args(argv)
    model = load_model()
    batch = make_batch(args.batch, args.seq)
    tx = gl.optimizer(optax.adamw(1e-3))
    wrapped = {
        "lora": gl.wrap(
            model.params, TARGETS, gl.LoRAConfig(rank=8), extra_trainable=["classifier"]
        ),
        "genlora": gl.wrap(
            model.params,
            TARGETS,
            gl.GenLoRAConfig(rank=8, groups=16),
            extra_trainable=["classifier"],
        ),
    }
    thunks, compiles = {}, {}
    for name, params in wrapped.items():
        thunks[f"{name} step"], compiles[f"{name} step"] = timed_step(model, params, batch, tx)
    full = full_tree_step(model, tx)
    gparams = wrapped["genlora"]
    gstate = tx.init(gparams)
    compiles["genlora full-tree step"] = compile_seconds(full, gparams, gstate, batch)
    thunks["genlora full-tree step"] = lambda: full(gparams, gstate, batch)

    forward = jax.jit(lambda p, ids, mask: model(ids, mask, params=p).logits)
    merged = gl.merge(gparams)
    thunks["base forward"] = lambda: forward(
        model.params, batch["input_ids"], batch["attention_mask"]
    )
    thunks["merged forward"] = lambda: forward(merged, batch["input_ids"], batch["attention_mask"])

    medians = interleaved_medians(thunks, repeats=args.repeats)
    ratios = [
        ("GenLoRA step / LoRA step", "genlora step", "lora step", 1.02),
        ("full-tree step / adapter-only step", "genlora full-tree step", "genlora step", 1.02),
        ("merged forward / base forward", "merged forward", "base forward", 1.01),
    ]
    lines = [
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}; batch {args.batch} x {args.seq}, "
        f"MiniLM-L6, q/k/v, r=8; median of {args.repeats} interleaved repeats",
        "",
        "| measurement | median ms | compile s |",
        "| --- | ---: | ---: |",
    ]
    for name, sec in medians.items():
        comp = f"{compiles[name]:.1f}" if name in compiles else ""
        lines.append(f"| {name} | {1000 * sec:.1f} | {comp} |")
    lines += ["", "| ratio | measured | target | met |", "| --- | ---: | ---: | --- |"]
    for label, num, den, target in ratios:
        r = medians[num] / medians[den]
        lines.append(f"| {label} | {r:.3f} | ≤ {target} | {'yes' if r <= target else 'no'} |")
    return report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
