"""Counting trainable parameters: per adapted module, in total, and method against method."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax

from genlora_jax._masking import trainable_mask
from genlora_jax._tree import flat, is_adapter, is_extra, named_adapters, path_str, sites
from genlora_jax._wrap import wrap
from genlora_jax.methods.base import Adapter, AdapterConfig
from genlora_jax.methods.lora import LoRAConfig
from genlora_jax.quant import QuantizedKernel


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
    mask = flat(trainable_mask(params))
    trainable = frozen = 0
    per_module: dict[str, int] = {}
    for key, leaf in flat(params).items():
        if isinstance(leaf, QuantizedKernel):  # frozen; counted as the numbers it holds
            sizes, flags = [math.prod(leaf.shape)], [False]
        else:
            sizes = jax.tree.leaves(jax.tree.map(_size, leaf))
            flags = jax.tree.leaves(mask[key])
        live = sum(s for s, t in zip(sizes, flags, strict=True) if t)
        trainable += live
        frozen += sum(sizes) - live
        if is_adapter(key, leaf):
            name = path_str(key[:-1])
        elif is_extra(key, leaf):
            name = path_str(key[1:-1])
        else:
            continue
        per_module[name] = per_module.get(name, 0) + live
    return ParamCount(trainable, frozen, per_module)


def _shapes(adapter: Adapter) -> str:
    """The adapter's array fields and their shapes, e.g. 'a(8, 64) b(32, 8)'."""
    return " ".join(f"{k}{tuple(v.shape)}" for k, v in vars(adapter).items() if hasattr(v, "shape"))


def _table(rows: list[tuple[str, ...]], columns: int) -> str:
    """Left-aligned columns; cells after ``columns`` run on unpadded."""
    widths = [max(len(r[i]) for r in rows) for i in range(columns)]
    return "\n".join(
        "  ".join(
            [*(c.ljust(w) for c, w in zip(r[:columns], widths, strict=True)), *r[columns:]]
        ).rstrip()
        for r in rows
    )


def summary(params: Mapping) -> str:
    """A text table: one row per adapted module (method, shapes, trainable), and totals."""
    counts = count_params(params)
    rows = [("module", "method", "shapes", "trainable")]
    for name, adapter in named_adapters(params).items():
        rows.append((name, adapter.config.method, _shapes(adapter), f"{counts.per_module[name]:,}"))
    total = counts.trainable + counts.frozen
    rows.append(("total", "", f"of {total:,}", f"{counts.trainable:,}"))
    return _table(rows, 4)


def compare_methods(
    params: Mapping, targets: Sequence[str], configs: Mapping[str, AdapterConfig]
) -> str:
    """A text table: per method, trainable numbers, ratio to LoRA, and shapes.

    Every method is wrapped under `jax.eval_shape`, so nothing is allocated:
    ``params`` may be real arrays or a tree of `jax.ShapeDtypeStruct` (e.g. a
    LLaMA-3-8B shape tree). Ratios are to the first `LoRAConfig` in
    ``configs``, or to LoRA at r = 8 when there is none. The shapes column
    lists the adapter's array fields for the first adapted module.

    Args:
        params: the base parameter tree (unwrapped).
        targets: as for `wrap`.
        configs: row name → method config, in display order.

    Returns:
        The table, one row per entry of ``configs``.

    Example:
        >>> import jax.numpy as jnp, genlora_jax as gl
        >>> base = {"q": {"kernel": jnp.ones((64, 32))}}
        >>> print(gl.compare_methods(base, ["q"], {"LoRA r=8": gl.LoRAConfig()}))
        method    kind  trainable  vs LoRA  shapes of q (m=32, n=64)
        LoRA r=8  lora  768        1.000    a(8, 64) b(32, 8)
    """
    if not configs:
        raise ValueError("configs is empty; pass e.g. {'LoRA r=8': genlora_jax.LoRAConfig()}.")

    def shapes(config: AdapterConfig):
        return jax.eval_shape(lambda p: wrap(p, targets, config), params)

    wrapped = {name: shapes(config) for name, config in configs.items()}
    counts = {name: count_params(tree).trainable for name, tree in wrapped.items()}
    lora = next((name for name, c in configs.items() if type(c) is LoRAConfig), None)
    reference = counts[lora] if lora else count_params(shapes(LoRAConfig())).trainable
    rows = []
    for name, tree in wrapped.items():
        site = min(sites(tree), key=lambda s: s.path)
        ratio = f"{counts[name] / reference:.3f}"
        rows.append((name, configs[name].method, f"{counts[name]:,}", ratio, _shapes(site.adapter)))
    header = ("method", "kind", "trainable", "vs LoRA" if lora else "vs LoRA r=8")
    m, n = site.shape
    rows.insert(0, (*header, f"shapes of {site.name} (m={m}, n={n})"))
    return _table(rows, 4)
