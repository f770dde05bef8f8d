"""Writes ``ckpt_v0_1/`` and ``ckpt_v0_1.npz``: an adapter checkpoint made by
genlora_jax 0.1.0 (commit e4e82db), which later versions must still restore.

Run once with the 0.1.0 code on the path:
    git worktree add /tmp/old e4e82db
    PYTHONPATH=/tmp/old python tests/library/data/make_v0_1_checkpoint.py
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import genlora_jax as gl

HERE = Path(__file__).resolve().parent


def base():
    """A two-projection tree, the same in every version."""
    k1, k2 = jax.random.split(jax.random.key(7))
    return {
        "q": {"kernel": jax.random.normal(k1, (16, 8)), "bias": jnp.zeros(8)},
        "v": {"kernel": jax.random.normal(k2, (16, 8))},
        "head": {"kernel": jnp.ones((8, 2))},
    }


def wrapped(gl_module):
    return gl_module.wrap(
        base(),
        ["q", "v"],
        gl_module.GenLoRAConfig(rank=2, groups=4),
        rng=jax.random.key(3),
        overrides={"v": gl_module.LoRAConfig(rank=2)},
        extra_trainable=["head"],
    )


def main() -> None:
    params = wrapped(gl)
    adapters = gl.split(params)[1]
    noise = jax.random.split(jax.random.key(11), len(jax.tree.leaves(adapters)))
    leaves = [
        x + 0.1 * jax.random.normal(k, x.shape)
        for x, k in zip(jax.tree.leaves(adapters), noise, strict=True)
    ]
    adapters = jax.tree.unflatten(jax.tree.structure(adapters), leaves)
    tx = gl.optimizer(optax.adam(1e-2))
    opt_state = tx.init(adapters)
    updates, opt_state = tx.update(jax.tree.map(jnp.ones_like, adapters), opt_state, adapters)
    adapters = optax.apply_updates(adapters, updates)
    with gl.AdapterCheckpointer(HERE / "ckpt_v0_1") as ckpt:
        ckpt.save(
            3,
            gl.join(gl.split(params)[0], adapters),
            opt_state=opt_state,
            rng=jax.random.key(5),
            data_position=24,
        )
    flat = jax.tree_util.tree_flatten_with_path((adapters, opt_state))[0]
    np.savez(
        HERE / "ckpt_v0_1.npz",
        **{jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat},
    )
    print("wrote", HERE / "ckpt_v0_1", file=sys.stderr)


if __name__ == "__main__":
    main()
