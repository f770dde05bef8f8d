"""Side-by-side parameter counts of adapter methods on one model and target set."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
from flax import traverse_util
from flax.core import unfreeze

from genlora_jax._adapter import Adapter, AdapterConfig
from genlora_jax._count import count_params
from genlora_jax._lora import LoRAConfig
from genlora_jax._wrap import ADAPTER_KEY, path_str, wrap


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
        flat = traverse_util.flatten_dict(unfreeze(tree))
        path = min(key[:-1] for key, leaf in flat.items() if isinstance(leaf, Adapter))
        adapter, kernel = flat[(*path, ADAPTER_KEY)], flat[(*path, "kernel")]
        n, m = kernel.shape[-2:][:: -1 if adapter.kernel_transposed else 1]  # (L,) n m
        fields = " ".join(
            f"{k}{tuple(v.shape)}" for k, v in vars(adapter).items() if hasattr(v, "shape")
        )
        ratio = f"{counts[name] / reference:.3f}"
        rows.append((name, configs[name].method, f"{counts[name]:,}", ratio, fields))
    header = ("method", "kind", "trainable", "vs LoRA" if lora else "vs LoRA r=8")
    rows.insert(0, (*header, f"shapes of {path_str(path)} (m={m}, n={n})"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join(
        "  ".join([*(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)), r[4]]).rstrip()
        for r in rows
    )
