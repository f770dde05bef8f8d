"""Folding adapters into the base weights (W = W0 + ΔW) and back.

Kernels of layers under ``nn.scan`` carry leading layer axes, (L, n, m), and
so do their adapters (``wrap(..., stacked=...)``); the per-layer weights are
computed under `jax.vmap` over those axes.
"""

from __future__ import annotations

import collections
import hashlib
import warnings
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from genlora_jax import _guard
from genlora_jax._tree import Params, Site, flat, model_params, plain_params, sites, unflat
from genlora_jax.methods.base import Adapter
from genlora_jax.quant import QuantizedKernel

# Digest of a merged kernel → digests of the adapters merged into it (newest last).
_MERGED: collections.OrderedDict[bytes, set[bytes]] = collections.OrderedDict()
_MAX_RECORDS = 1 << 16


def _concrete(*trees) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(trees))


def _digest(*arrays) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        a = np.asarray(a)
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.digest()


def _kernel_digest(path: tuple, kernel) -> bytes:
    """Digest of a kernel's path, shape, dtype and two random projections uᵀ K v
    of all its values (computed where the kernel lives; any edit moves them)."""
    k = jnp.asarray(kernel, jnp.float32).reshape(-1, kernel.shape[-1])
    keys = jax.random.split(jax.random.key(0), 4)
    rows = [jax.random.normal(key, (k.shape[0],)) for key in keys[:2]]
    cols = [jax.random.normal(key, (k.shape[1],)) for key in keys[2:]]
    projections = jnp.stack([u @ (k @ v) for u, v in zip(rows, cols, strict=True)])
    tag = np.frombuffer(f"{'/'.join(map(str, path))}|{kernel.dtype}".encode(), np.uint8)
    return _digest(tag, projections)


def _adapter_digest(adapter: Adapter) -> bytes:
    """Digest of the adapter's arrays and its static part (class, config, orientation)."""
    structure = np.frombuffer(str(jax.tree.structure(adapter)).encode(), np.uint8)
    return _digest(structure, *jax.tree.leaves(adapter))


def _recordable(*trees) -> bool:
    """Concrete arrays that this process can read (not tracers, not multi-host shards)."""
    return all(
        not isinstance(x, jax.core.Tracer) and getattr(x, "is_fully_addressable", True)
        for x in jax.tree.leaves(trees)
    )


def _record(kernel: bytes, adapter: bytes) -> None:
    _MERGED.setdefault(kernel, set()).add(adapter)
    _MERGED.move_to_end(kernel)
    while len(_MERGED) > _MAX_RECORDS:
        _MERGED.popitem(last=False)


def merge(params: Mapping) -> Params:
    """Plain params of the original structure, with every kernel W0 + ΔW.

    Quantized kernels (`genlora_jax.quant`) come back dequantized, with a
    warning: the merged tree is float (each kernel in its ``dtype``).

    The result needs no interceptor: ``model(..., params=merge(params))``.
    ΔW is computed in float32 and the sum is cast to the kernel's dtype.
    Outside `jax.jit`, each merged kernel is recorded (a digest of its values
    and of its adapter) so that `unmerge` can refuse what this merge did not
    produce.

    Raises:
        ValueError: an adapter cannot be merged (its nonlinearity acts on
            activations, e.g. AuroRA).
    """
    out = plain_params(params)
    quantized = [key for key, leaf in out.items() if isinstance(leaf, QuantizedKernel)]
    if quantized:
        warnings.warn(
            f"merge dequantizes the {len(quantized)} quantized kernels of this tree (W0 + ΔW "
            "is not in the block format); the merged tree is float.",
            stacklevel=2,
        )
        out.update({key: out[key].dequantize() for key in quantized})
    for site in sites(params):
        if not site.adapter.mergeable:
            raise ValueError(
                f"{site.name}: {type(site.adapter).__name__} cannot be merged into W0 "
                "(its nonlinearity acts on activations); serve it with `genlora_jax.apply`."
            )
        kernel = site.with_w(site.per_layer(lambda a, w: a.merged_weight(w)))
        out[site.kernel_key] = kernel
        if _recordable(kernel, site.adapter):
            _record(_kernel_digest(site.kernel_key, kernel), _adapter_digest(site.adapter))
    return unflat(out)


def inference_params(params: Mapping) -> tuple[Params, bool]:
    """The tree to serve ``params`` with, and whether it needs `adapted`.

    Merging costs nothing per token, so every adapter that can merge is
    merged; a tree with one that cannot (AuroRA) is served through the
    interceptor instead.

    Args:
        params: a wrapped tree (`wrap`), or plain model params.

    Returns:
        ``(merge(params), False)`` when every adapter merges, else
        ``(model_params(params), True)``; use the flag as
        ``with genlora_jax.adapted(enabled=flag): model(..., params=tree)``.
    """
    if all(site.adapter.mergeable for site in sites(params)):
        return merge(params), False
    return model_params(params), True


def _verify(site: Site) -> None:
    """Raises unless ``site.kernel`` is what `merge` made of some W0 with ``site.adapter``."""
    if not _concrete(site.kernel, site.adapter):
        raise ValueError(
            f"{site.name}: unmerge cannot check under jax.jit that this kernel was merged with "
            "these adapters; call it outside jit, or pass verify=False if you are sure."
        )
    record = _MERGED.get(_kernel_digest(site.kernel_key, site.kernel))
    if record is None:
        raise ValueError(
            f"{site.name}: this kernel is not one that genlora_jax.merge produced in this "
            "process (never merged, changed since, merged under jax.jit, or merged elsewhere); "
            "unmerging it would shift W0 by -ΔW. Unmerge the tree that merge returned, with "
            "the adapters it merged; if it was merged under jit or in another process and you "
            "are sure, pass verify=False."
        )
    if _adapter_digest(site.adapter) not in record:
        raise ValueError(
            f"{site.name}: this kernel was merged with other adapters than the ones given; "
            "unmerging would not recover W0. Pass the adapter half of the tree that was merged "
            "(`genlora_jax.split(params)[1]`)."
        )


def unmerge(merged: Mapping, adapters: Mapping, *, verify: bool = True) -> Params:
    """Inverse of `merge`: the wrapped tree, given the adapter half of `split`.

    Kernels are recovered as W − ΔW in float32, so they equal the original W0
    up to rounding: |error| ≤ a few ulp of |W0| + |ΔW| (about 1e-7 relative in
    float32; bfloat16 kernels lose what the merge rounded away).

    Args:
        merged: a tree returned by `merge`.
        adapters: the adapter half (`split(params)[1]`) of the tree that was merged.
        verify: refuse kernels that `merge` did not produce in this process
            with exactly these adapters (a never-merged tree, adapters of
            another run, modules that were not merged). Checking needs
            concrete arrays; under `jax.jit`, or for a tree merged in another
            process, pass False and vouch for the pair yourself.

    Raises:
        ValueError: ``verify`` found a kernel that is not the merge of these
            adapters, or an adapter's module has no kernel in ``merged``.
        NotImplementedError: an adapter cannot recover W0 (DoRA).
    """
    out = flat(merged)
    adapter_leaves = flat(adapters)
    pairs = []
    for key, leaf in adapter_leaves.items():
        if isinstance(leaf, Adapter):
            kernel = out.get((*key[:-1], "kernel"))
            if kernel is None:
                raise ValueError(
                    f"{'/'.join(key[:-1])}: the adapters have a module that the merged tree "
                    "lacks; these adapters belong to another model."
                )
            pairs.append(Site(key[:-1], kernel, leaf))
        else:  # an extra trainable leaf: back under the root key
            out[key] = out.pop(key[1:])
    for site in pairs:
        out[site.kernel_key] = site.with_w(site.per_layer(lambda a, w: a.unmerged_weight(w)))
        out[site.adapter_key] = site.adapter
    if verify:
        for site in pairs:
            _verify(site)
    _guard.install()
    return unflat(out)
