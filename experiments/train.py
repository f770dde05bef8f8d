"""A jitted training loop for wrapped params: the one every experiment uses.

Only the adapter half of the tree (`genlora_jax.split`) is differentiated and
updated; the base weights enter the step as an argument and come back
untouched. AdamW with linear warm-up and linear decay to 0 (the paper's
schedule), optional gradient accumulation (`optax.MultiSteps`), adapter
dropout, NaN guard, JSON-lines metrics, a tqdm bar with loss and examples/s,
a loss-curve figure, and orbax checkpoints (`genlora_jax.AdapterCheckpointer`)
every N steps: a run restarted with the same arguments resumes from the latest
checkpoint and reaches the same adapters (batches are a function of the step).
Ctrl-C saves a checkpoint before it stops.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import genlora_jax as gl

Batch = Mapping[str, np.ndarray]
LossFn = Callable[[dict, Batch, jax.Array | None], jax.Array]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimisation settings (defaults follow GENLORA.md §4).

    Attributes:
        steps: optimizer updates.
        lr: peak learning rate.
        warmup_steps: linear warm-up from 0 (capped at half the run for short runs).
        weight_decay: AdamW decay on trainable leaves (paper: 0).
        grad_accum: micro-batches per update.
        seed: seeds adapter dropout.
        log_every: steps between metric lines.
        checkpoint_every: micro-steps between checkpoints (0: only at the end
            and on Ctrl-C, when a checkpoint directory is given).
        keep_checkpoints: how many checkpoints to keep.
    """

    steps: int
    lr: float
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_accum: int = 1
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 0
    keep_checkpoints: int = 3

    def __post_init__(self) -> None:
        for name, low in (
            ("steps", 1),
            ("warmup_steps", 0),
            ("grad_accum", 1),
            ("log_every", 1),
            ("checkpoint_every", 0),
            ("keep_checkpoints", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"TrainConfig: {name} must be an integer ≥ {low}, got {value!r}.")
        for name in ("lr", "weight_decay"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"TrainConfig: {name} must be a finite number ≥ 0, got {value!r}.")
        if self.lr == 0:
            raise ValueError("TrainConfig: lr=0 trains nothing; give a learning rate > 0.")


def learning_rate(cfg: TrainConfig) -> optax.Schedule:
    """Linear warm-up from 0 to ``cfg.lr``, then linear decay to 0 at the last step."""
    warmup = max(min(cfg.warmup_steps, cfg.steps // 2), 1)
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, cfg.lr, warmup),
            optax.linear_schedule(cfg.lr, 0.0, max(cfg.steps - warmup, 1)),
        ],
        [warmup],
    )


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW on trainable leaves with `learning_rate`, and gradient accumulation."""
    tx = gl.optimizer(optax.adamw(learning_rate(cfg), weight_decay=cfg.weight_decay))
    return optax.MultiSteps(tx, cfg.grad_accum) if cfg.grad_accum > 1 else tx


def _all_finite(tree) -> jax.Array:
    """A scalar bool: no NaN or inf in any floating leaf of ``tree``."""
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


MEMORY_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
"""XLA's CPU scheduler by default orders a program for parallelism and runs
the recomputations of `jax.checkpoint` / `nn.remat` early, which keeps every
layer's activations alive and undoes the rematerialisation. This flag selects
its memory-minimising scheduler. Measured on SmolLM2 (batch 8 × 128, q/k/v
GenLoRA, rematerialised layers, 128-token loss chunks): XLA temporaries
1,423 → 422 MiB; on the Q4_1/Q8_0 base 1,933 → 639 MiB."""


def use_memory_scheduler() -> bool:
    """Adds `MEMORY_SCHEDULER_FLAG` to ``XLA_FLAGS`` (read once, when JAX first
    starts its backends); False, with a warning, when they have started already.

    Process-wide: call it at the start of a run that trains with
    rematerialisation on the CPU. Other backends ignore the flag.
    """
    import os
    import warnings

    from jax._src import xla_bridge

    flags = os.environ.get("XLA_FLAGS", "")
    if MEMORY_SCHEDULER_FLAG in flags:
        return True
    if xla_bridge.backends_are_initialized():
        warnings.warn(
            "JAX's backends have started, so XLA_FLAGS is read already: rematerialisation "
            f"will save less on the CPU. Set XLA_FLAGS={MEMORY_SCHEDULER_FLAG} before "
            "the run starts.",
            stacklevel=2,
        )
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {MEMORY_SCHEDULER_FLAG}".strip()
    return True


def make_step(loss_fn: LossFn, tx: optax.GradientTransformation, *, donate: bool = False):
    """The jitted update ``(adapters, opt_state, base, batch, rng) -> (..., loss)``.

    ``donate=True`` donates the adapters and optimizer state to the step
    (``donate_argnums=(0, 1)``), so XLA may write the new ones over them; the
    arrays passed in are then deleted, and the caller must keep only what the
    step returns. Off by default and in `train`: measured on SmolLM2 with
    GenLoRA r = 8 (BENCHMARKS.md, "`donate_argnums`"), it changed XLA's step
    memory by 2 of 2,566 MiB and peak RSS and time not measurably, while an
    asynchronous checkpoint of donated arrays would read freed memory.
    """

    @functools.partial(jax.jit, donate_argnums=(0, 1) if donate else ())
    def step(adapters, opt_state, base, batch, rng):
        def adapter_loss(adapters):
            return loss_fn(gl.join(base, adapters), batch, rng)

        loss, grads = jax.value_and_grad(adapter_loss)(adapters)
        updates, new_state = tx.update(grads, opt_state, adapters)
        new_adapters = optax.apply_updates(adapters, updates)
        # a non-finite loss or update is never applied: the old state comes back (a NaN
        # gradient of a trainable leaf reaches the optimizer state or the update;
        # frozen leaves' gradients are dropped by the optimizer and not checked)
        finite = jnp.isfinite(loss) & _all_finite((new_adapters, new_state))
        keep = functools.partial(jnp.where, finite)
        return (
            jax.tree.map(keep, new_adapters, adapters),
            jax.tree.map(keep, new_state, opt_state),
            loss,
            finite,
        )

    return step


@dataclasses.dataclass
class TrainState:
    """Everything a resumed run needs: adapters, optimizer state, step, rng."""

    adapters: dict
    opt_state: Any
    step: int
    rng: jax.Array


class NonFiniteLoss(FloatingPointError):
    """The loss, a gradient or an update became NaN or inf (the step was not applied)."""


def train(
    params: dict,
    loss_fn: LossFn,
    batches: Callable[[int], Batch],
    cfg: TrainConfig,
    *,
    out_dir: str | Path | None = None,
    state: TrainState | None = None,
    on_step: Callable[[TrainState], None] | None = None,
    checkpoint_dir: str | Path | None = None,
    desc: str = "train",
) -> TrainState:
    """Runs ``cfg.steps`` updates (or the rest of them, from ``state``).

    Args:
        params: a wrapped tree (`genlora_jax.wrap`).
        loss_fn: ``(params, batch, adapter_rng) -> scalar``; the rng is for
            adapter dropout (pass it to `genlora_jax.apply`).
        batches: step index → micro-batch list for that update; deterministic,
            so a resumed run sees the same data. With ``grad_accum`` > 1 it is
            called once per micro-step index.
        cfg: optimisation settings.
        out_dir: where ``metrics.jsonl`` and ``loss.png`` go.
        state: resume from here; by default the latest checkpoint in
            ``checkpoint_dir``, if any.
        on_step: called after every micro-step (evaluation, custom logging).
        checkpoint_dir: orbax checkpoints of adapters, optimizer state, rng
            and step; a checkpoint for another model or config is refused.
        desc: label of the progress bar.

    Returns:
        The final `TrainState`.

    Raises:
        NonFiniteLoss: the loss is NaN or inf, naming the step and the fix.
        KeyboardInterrupt: after saving a checkpoint (when a directory is set).
    """
    base, adapters = gl.split(params)
    tx = make_optimizer(cfg)
    step_fn = make_step(loss_fn, tx)
    ckpt = (
        gl.AdapterCheckpointer(checkpoint_dir, max_to_keep=cfg.keep_checkpoints)
        if checkpoint_dir
        else None
    )
    if state is None and ckpt is not None and ckpt.latest_step() is not None:
        saved = ckpt.restore_latest(params, opt_state=tx.init(adapters))
        state = TrainState(gl.split(saved.params)[1], saved.opt_state, saved.step, saved.rng)
        print(f"resumed from {checkpoint_dir} at step {saved.step}")
    fresh = state is None
    if fresh:
        state = TrainState(adapters, tx.init(adapters), 0, jax.random.key(cfg.seed))

    def save(state: TrainState) -> None:
        if ckpt is not None and state.step not in ckpt.all_steps():
            ckpt.save(
                state.step,
                gl.join(base, state.adapters),
                opt_state=state.opt_state,
                rng=state.rng,
                data_position=state.step,
            )

    out = Path(out_dir) if out_dir else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    # a fresh run starts its metrics anew; a resumed one appends to them
    log = (out / "metrics.jsonl").open("w" if fresh else "a") if out else None
    micro_steps = cfg.steps * cfg.grad_accum
    bar = tqdm(total=micro_steps, initial=state.step, desc=desc, dynamic_ncols=True)
    losses, start, examples = [], time.perf_counter(), 0
    try:
        while state.step < micro_steps:
            batch = batches(state.step)
            rng, sub = jax.random.split(state.rng)
            new_adapters, opt_state, loss, finite = step_fn(
                state.adapters, state.opt_state, base, batch, sub
            )
            loss = float(loss)
            if not bool(finite):
                what = "the loss" if not math.isfinite(loss) else "a gradient or update"
                raise NonFiniteLoss(
                    f"{what} is NaN or inf at step {state.step} (loss {loss}); the step was not "
                    f"applied and nothing non-finite was saved. Lower the learning rate "
                    f"(lr={cfg.lr}) or lengthen warm-up, and restart from the last checkpoint."
                )
            state = TrainState(new_adapters, opt_state, state.step + 1, rng)
            losses.append(loss)
            examples += len(next(iter(batch.values())))
            bar.update(1)
            if state.step % cfg.log_every == 0 or state.step == micro_steps:
                rate = examples / (time.perf_counter() - start)
                window = float(np.mean(losses[-cfg.log_every :]))
                bar.set_postfix(loss=f"{window:.4f}", ex_per_s=f"{rate:.0f}")
                if log:
                    update = state.step // cfg.grad_accum
                    row = {
                        "update": update,
                        "micro_step": state.step,
                        "loss": window,
                        "ex_per_s": rate,
                    }
                    log.write(json.dumps(row) + "\n")
                    log.flush()
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                save(state)
            if on_step:
                on_step(state)
        save(state)
    except KeyboardInterrupt:
        save(state)
        print(f"\ninterrupted at step {state.step}; run the same command again to resume")
        raise
    finally:
        bar.close()
        if log:
            log.close()
        if ckpt is not None:
            ckpt.close()
    if out:
        plot_loss(out / "metrics.jsonl", out / "loss.png")
    return state


def plot_loss(metrics: Path, figure: Path) -> None:
    """Loss against step from a ``metrics.jsonl`` file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([r["update"] for r in rows], [r["loss"] for r in rows])
    ax.set(xlabel="update", ylabel="training loss", title=metrics.parent.name)
    fig.tight_layout()
    fig.savefig(figure, dpi=100)
    plt.close(fig)
