"""Folding adapters into the base weights (W = W0 + ΔW) and back.

Kernels of layers under ``nn.scan`` carry leading layer axes, (L, n, m), and
so do their adapters (``wrap(..., stacked=...)``); the per-layer weights are
computed under `jax.vmap` over those axes.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import unfreeze

from genlora_jax import _guard
from genlora_jax._adapter import Adapter
from genlora_jax._wrap import ADAPTER_KEY, Params, path_str

# Digest of a merged kernel → digests of the adapters merged into it (newest last).
_MERGED: collections.OrderedDict[bytes, set[bytes]] = collections.OrderedDict()
_MAX_RECORDS = 1 << 16


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

    The result needs no interceptor: ``model(..., params=merge(params))``.
    ΔW is computed in float32 and the sum is cast to the kernel's dtype.
    Outside `jax.jit`, each merged kernel is recorded (a digest of its values
    and of its adapter) so that `unmerge` can refuse what this merge did not
    produce.

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
        if _recordable(out[kpath], adapter):
            _record(_kernel_digest(kpath, out[kpath]), _adapter_digest(adapter))
    return traverse_util.unflatten_dict(out)


def _verify(kpath: tuple, kernel, adapter: Adapter) -> None:
    """Raises unless ``kernel`` is what `merge` made of some W0 with ``adapter``."""
    where = path_str(kpath[:-1])
    if not _concrete(kernel, adapter):
        raise ValueError(
            f"{where}: unmerge cannot check under jax.jit that this kernel was merged with "
            "these adapters; call it outside jit, or pass verify=False if you are sure."
        )
    record = _MERGED.get(_kernel_digest(kpath, kernel))
    if record is None:
        raise ValueError(
            f"{where}: this kernel is not one that genlora_jax.merge produced in this process "
            "(never merged, changed since, merged under jax.jit, or merged elsewhere); "
            "unmerging it would shift W0 by -ΔW. Unmerge the tree that merge returned, with "
            "the adapters it merged; if it was merged under jit or in another process and you "
            "are sure, pass verify=False."
        )
    if _adapter_digest(adapter) not in record:
        raise ValueError(
            f"{where}: this kernel was merged with other adapters than the ones given; "
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
    flat = traverse_util.flatten_dict(unfreeze(merged))
    out = dict(flat)
    checks = []
    for key, leaf in traverse_util.flatten_dict(unfreeze(adapters)).items():
        if isinstance(leaf, Adapter):
            kpath = (*key[:-1], "kernel")
            if kpath not in flat:
                raise ValueError(
                    f"{path_str(key[:-1])}: the adapters have a module that the merged tree "
                    "lacks; these adapters belong to another model."
                )
            kernel = flat[kpath]
            w0 = _per_layer(lambda a, w: a.unmerged_weight(w), kernel)(leaf, _w0(kernel, leaf))
            out[kpath] = _kernel(w0, leaf, kernel.dtype)
            out[key] = leaf
            checks.append((kpath, kernel, leaf))
        else:
            out[key] = out.pop(key[1:])
    if verify:
        for check in checks:
            _verify(*check)
    _guard.install()
    return traverse_util.unflatten_dict(out)
