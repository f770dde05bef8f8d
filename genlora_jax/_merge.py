"""Folding adapters into the base weights (W = W0 + ΔW) and back.

Kernels of layers under ``nn.scan`` carry leading layer axes, (L, n, m), and
so do their adapters (``wrap(..., stacked=...)``); the per-layer weights are
computed under `jax.vmap` over those axes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from flax import traverse_util
from flax.core import unfreeze

from genlora_jax._adapter import Adapter
from genlora_jax._wrap import ADAPTER_KEY, Params, path_str


def _w0(kernel, adapter: Adapter):
    w0 = kernel if adapter.kernel_transposed else jnp.swapaxes(kernel, -1, -2)
    return w0.astype(jnp.float32)


def _kernel(w, adapter: Adapter, dtype):
    return (w if adapter.kernel_transposed else jnp.swapaxes(w, -1, -2)).astype(dtype)


def _per_layer(fn: Callable, kernel) -> Callable:
    """``fn(adapter, w)`` mapped over the layer axes of a stacked kernel (all
    but its last two axes); ``fn`` itself for a 2-D kernel."""
    for _ in range(kernel.ndim - 2):
        fn = jax.vmap(fn)
    return fn


def merge(params: Mapping) -> Params:
    """Plain params of the original structure, with every kernel W0 + ΔW.

    The result needs no interceptor: ``model(..., params=merge(params))``.
    ΔW is computed in float32 and the sum is cast to the kernel's dtype.

    Raises:
        ValueError: an adapter cannot be merged (its nonlinearity acts on
            activations, e.g. AuroRA).
    """
    flat = traverse_util.flatten_dict(unfreeze(params))
    out = {}
    for key, leaf in flat.items():
        if isinstance(leaf, Adapter):
            continue
        out[key[1:] if key[0] == ADAPTER_KEY else key] = leaf
    for key, adapter in flat.items():
        if not isinstance(adapter, Adapter):
            continue
        if not adapter.mergeable:
            raise ValueError(
                f"{path_str(key[:-1])}: {type(adapter).__name__} cannot be merged into W0 "
                "(its nonlinearity acts on activations); serve it with `genlora_jax.apply`."
            )
        kpath = (*key[:-1], "kernel")
        kernel = flat[kpath]
        merged = _per_layer(lambda a, w: a.merged_weight(w), kernel)(adapter, _w0(kernel, adapter))
        out[kpath] = _kernel(merged, adapter, kernel.dtype)
    return traverse_util.unflatten_dict(out)


def unmerge(merged: Mapping, adapters: Mapping) -> Params:
    """Inverse of `merge`: the wrapped tree, given the adapter half of `split`.

    Kernels are recovered as W − ΔW in float32, so they equal the original W0
    up to rounding: |error| ≤ a few ulp of |W0| + |ΔW| (about 1e-7 relative in
    float32; bfloat16 kernels lose what the merge rounded away).
    """
    flat = traverse_util.flatten_dict(unfreeze(merged))
    out = dict(flat)
    for key, leaf in traverse_util.flatten_dict(unfreeze(adapters)).items():
        if isinstance(leaf, Adapter):
            kpath = (*key[:-1], "kernel")
            kernel = flat[kpath]
            w0 = _per_layer(lambda a, w: a.unmerged_weight(w), kernel)(leaf, _w0(kernel, leaf))
            out[kpath] = _kernel(w0, leaf, kernel.dtype)
            out[key] = leaf
        else:
            out[key] = out.pop(key[1:])
    return traverse_util.unflatten_dict(out)
