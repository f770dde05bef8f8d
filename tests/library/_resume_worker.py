"""A tiny GenLoRA training run that checkpoints, for the kill-and-resume test.

    python tests/_resume_worker.py DIR OUT.npz --steps 8 [--save-at 4] [--hang]
        [--interrupt-save-at 6]

Trains a 3-layer MLP (GenLoRA on two layers, dropout on, a trainable head)
with AdamW on a fixed synthetic data set read in a per-epoch shuffled order,
resuming from the latest checkpoint in DIR if there is one. Prints
``saved <step>`` once a checkpoint is on disk, and at the end writes the
adapter leaves to OUT.npz, or with ``--hang`` sleeps there to be killed.
``--interrupt-save-at k`` starts an asynchronous save at step k and kills
itself (SIGKILL) before the save can finish.
"""

from __future__ import annotations

import argparse
import os
import signal
import time

import flax.linen as nn
import jax
import numpy as np
import optax

import genlora_jax as gl

EXAMPLES, BATCH, FEATURES, CLASSES = 48, 8, 16, 4


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(32, name="up")(x))
        x = nn.gelu(nn.Dense(32, name="mid")(x))
        return nn.Dense(CLASSES, name="head")(x)


def batch_at(position: int) -> tuple[np.ndarray, np.ndarray]:
    """The batch starting at example ``position`` of the stream (NumPy: no compiles)."""
    data = np.random.default_rng(7)
    x = data.standard_normal((EXAMPLES, FEATURES), np.float32)
    y = data.integers(0, CLASSES, EXAMPLES)
    epoch, offset = divmod(position, EXAMPLES)
    order = np.random.default_rng(100 + epoch).permutation(EXAMPLES)
    idx = order[offset : offset + BATCH]
    return x[idx], y[idx]


def pretrained(features: int = FEATURES) -> dict:
    """The frozen base weights, the same in every process (NumPy: no compiles)."""
    weights = np.random.default_rng(0)
    shapes = {"up": (features, 32), "mid": (32, 32), "head": (32, CLASSES)}
    return {
        name: {
            "kernel": (weights.standard_normal((n, m)) / np.sqrt(n)).astype(np.float32),
            "bias": np.zeros(m, np.float32),
        }
        for name, (n, m) in shapes.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--save-at", type=int, default=-1)
    parser.add_argument("--hang", action="store_true")
    parser.add_argument("--interrupt-save-at", type=int, default=-1)
    args = parser.parse_args()

    model = MLP()
    tx = gl.optimizer(optax.adamw(1e-2))

    @jax.jit
    def setup(base):
        params = gl.wrap(
            base,
            ["up", "mid"],
            gl.GenLoRAConfig(rank=4, groups=4, dropout=0.1),
            rng=jax.random.key(1),
            extra_trainable=["head"],
        )
        return params, tx.init(gl.split(params)[1])

    params, opt_state = setup(pretrained())
    base, adapters = gl.split(params)
    rng, step = jax.random.key(2), 0

    ckpt = gl.AdapterCheckpointer(args.directory, async_save=args.interrupt_save_at >= 0)
    if ckpt.latest_step() is not None:
        state = ckpt.restore(params, opt_state=opt_state)
        adapters, opt_state = gl.split(state.params)[1], state.opt_state
        rng, step = state.rng, state.step
        assert state.data_position == step * BATCH

    @jax.jit
    def train_step(adapters, opt_state, base, x, y, rng):
        rng, dropout_rng = jax.random.split(rng)

        def loss_fn(adapters):
            logits = gl.apply(model, gl.join(base, adapters), x, adapter_rng=dropout_rng)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads = jax.grad(loss_fn)(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, rng

    while step < args.steps:
        adapters, opt_state, rng = train_step(
            adapters, opt_state, base, *batch_at(step * BATCH), rng
        )
        step += 1
        if step in (args.save_at, args.interrupt_save_at):
            ckpt.save(
                step,
                gl.join(base, adapters),
                opt_state=opt_state,
                rng=rng,
                data_position=step * BATCH,
            )
            if step == args.interrupt_save_at:
                os.kill(os.getpid(), signal.SIGKILL)
            ckpt.wait_until_finished()
            print(f"saved {step}", flush=True)
    ckpt.close()
    if args.hang:
        time.sleep(600)
    leaves = jax.tree_util.tree_flatten_with_path(adapters)[0]
    np.savez(args.out, **{jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves})


if __name__ == "__main__":
    main()
