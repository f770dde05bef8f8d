"""Counting trainable parameters, per adapted module and in total."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
from flax import traverse_util
from flax.core import unfreeze

from genlora_jax._adapter import Adapter
from genlora_jax._masking import trainable_mask
from genlora_jax._wrap import ADAPTER_KEY, path_str


class ParamCount(NamedTuple):
    """Parameter counts of a wrapped tree.

    Attributes:
        trainable: numbers that train.
        frozen: numbers that do not (the base and frozen adapter fields).
        per_module: module path → its trainable numbers; adapters by the
            projection they adapt, extras by their own module path.
    """

    trainable: int
    frozen: int
    per_module: dict[str, int]


def _size(leaf: Any) -> int:
    return math.prod(leaf.shape)


def count_params(params: Mapping) -> ParamCount:
    """Counts a wrapped tree; works on `jax.ShapeDtypeStruct` leaves too.

    Example:
        >>> import jax.numpy as jnp, genlora_jax as gl
        >>> base = {"q": {"kernel": jnp.ones((64, 32))}}
        >>> p = gl.wrap(base, ["q"], gl.GenLoRAConfig(rank=8, groups=16))
        >>> gl.count_params(p).trainable  # m + n + 2·r·G·(K+1)
        4192
    """
    mask = traverse_util.flatten_dict(unfreeze(trainable_mask(params)))
    trainable = frozen = 0
    per_module: dict[str, int] = {}
    for key, leaf in traverse_util.flatten_dict(unfreeze(params)).items():
        sizes = jax.tree.leaves(jax.tree.map(_size, leaf))
        flags = jax.tree.leaves(mask[key])
        live = sum(s for s, t in zip(sizes, flags, strict=True) if t)
        trainable += live
        frozen += sum(sizes) - live
        if isinstance(leaf, Adapter):
            name = path_str(key[:-1])
        elif key[0] == ADAPTER_KEY:
            name = path_str(key[1:-1])
        else:
            continue
        per_module[name] = per_module.get(name, 0) + live
    return ParamCount(trainable, frozen, per_module)


def summary(params: Mapping) -> str:
    """A text table: one row per adapted module (method, shapes, trainable), and totals."""
    flat = traverse_util.flatten_dict(unfreeze(params))
    counts = count_params(params)
    rows = [("module", "method", "shapes", "trainable")]
    for key, leaf in flat.items():
        name = path_str(key[:-1])
        if isinstance(leaf, Adapter):
            shapes = " ".join(
                f"{k}{tuple(v.shape)}" for k, v in vars(leaf).items() if hasattr(v, "shape")
            )
            rows.append((name, leaf.config.method, shapes, f"{counts.per_module[name]:,}"))
    total = counts.trainable + counts.frozen
    rows.append(("total", "", f"of {total:,}", f"{counts.trainable:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
