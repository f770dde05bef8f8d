"""Which leaves train, and an optimizer that updates only those."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax

from genlora_jax._tree import flat, is_adapter_state, unflat
from genlora_jax.methods.base import Adapter


def _array_fields(adapter: Adapter) -> list[str]:
    return [f.name for f in dataclasses.fields(adapter) if f.metadata.get("pytree_node", True)]


def trainable_mask(params: Any) -> Any:
    """A tree like ``params`` with True on the leaves that train.

    Trainable: the array fields of every adapter except those its config
    freezes (`Adapter.frozen_fields`, e.g. GenLoRA's ``freeze_z_a``), and the
    extra leaves under the root ``"genlora"`` key. Everything else is False.
    Works on full wrapped trees, on the adapter half of `split`, and on
    gradient trees of the same structure.
    """
    out = {}
    for key, leaf in flat(params).items():
        if isinstance(leaf, Adapter):
            frozen = leaf.frozen_fields()
            out[key] = leaf.replace(**{f: f not in frozen for f in _array_fields(leaf)})
        else:  # an array, or a node of arrays (a quantized kernel)
            flag = is_adapter_state(key)
            out[key] = jax.tree.map(lambda _, flag=flag: flag, leaf)
    return unflat(out)


def optimizer(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` on the trainable leaves, zero updates and no state elsewhere.

    Built on `optax.multi_transform` with labels taken from `trainable_mask`,
    so frozen leaves (the base, frozen latents) carry no optimizer state.

    Example:
        >>> tx = gl.optimizer(optax.adamw(1e-3))  # doctest: +SKIP
        >>> opt_state = tx.init(params)           # or tx.init(split(params)[1])
    """

    def labels(tree: Any) -> Any:
        return jax.tree.map(lambda t: "trainable" if t else "frozen", trainable_mask(tree))

    inner = optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)

    def init(params: Any) -> Any:
        if not any(jax.tree.leaves(trainable_mask(params))):
            raise ValueError(
                "this tree has no trainable leaf (no adapter, no extra trainable leaf), so "
                "every update would be zero. Initialise the optimizer with the tree returned "
                "by `genlora_jax.wrap` (or its adapter half, `genlora_jax.split(params)[1]`)."
            )
        return inner.init(params)

    return inner._replace(init=init)
