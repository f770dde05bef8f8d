"""Applying adapters at call time with `flax.linen.intercept_methods`.

The model is not rewritten: inside `adapted()`, every ``__call__`` of a module
whose params hold a ``"genlora"`` entry returns the adapter's output instead of
the base output. Adapters are read from the module's own variables, so the
same code serves plain, remat-ed and scanned layers, under `jax.jit` and
`jax.grad`, with the base weights entering as ordinary arguments.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray

from genlora_jax import _guard, quant
from genlora_jax._tree import (
    ADAPTER_KEY,
    Params,
    flat,
    is_adapter,
    model_params,
    path_str,
    unflat,
    w_layout,
)
from genlora_jax._wrap import check_rng
from genlora_jax.methods.base import Adapter, Factors, LowRankAdapter
from genlora_jax.quant import QuantizedKernel

_ACTIVE = threading.local()


def _active() -> set[int]:
    if not hasattr(_ACTIVE, "modules"):
        _ACTIVE.modules = set()
    return _ACTIVE.modules


def _check_orientation(module: nn.Module, adapter: Adapter, x: jax.Array, w0: jax.Array) -> None:
    path = path_str(module.path)
    conv1d = type(module).__name__.endswith("Conv1D")
    if isinstance(module, nn.Dense) == adapter.kernel_transposed or (
        conv1d != adapter.kernel_transposed
    ):
        raise ValueError(
            f"{path}: the adapter assumes a kernel stored as "
            f"{'(out, in)' if adapter.kernel_transposed else '(in, out)'}, but the module is "
            f"a {type(module).__name__}; fix `transposed_kernels=` in `wrap`."
        )
    if x.shape[-1] != w0.shape[1]:
        raise ValueError(
            f"{path}: the input has {x.shape[-1]} features but the adapter expects "
            f"n={w0.shape[1]}; the kernel orientation is wrong, fix `transposed_kernels=`."
        )


def _quantized_kernel(module: nn.Module) -> QuantizedKernel | None:
    if not module.has_variable("params", "kernel"):
        return None
    kernel = module.get_variable("params", "kernel")
    if not isinstance(kernel, QuantizedKernel):
        return None
    if not isinstance(module, nn.Dense):
        raise TypeError(
            f"{path_str(module.path)}: a quantized kernel in a {type(module).__name__}; "
            "genlora_jax dequantizes the kernels of nn.Dense modules only. Leave this module "
            "in float (quantize_base(..., skip=(name,)))."
        )
    return kernel


def _quantized_table(module: nn.Module) -> QuantizedKernel | None:
    if not isinstance(module, nn.Embed) or not module.has_variable("params", "embedding"):
        return None
    table = module.get_variable("params", "embedding")
    return table if isinstance(table, QuantizedKernel) else None


@jax.custom_vjp
def _gradients_first(x: jax.Array, adapter: Adapter) -> tuple[jax.Array, Adapter]:
    """The identity on (x, adapter), whose backward pass makes x's cotangent
    wait for the adapter's gradient.

    An adapter's gradient (e.g. gᵀ·(x A), (n, r)) is small, but it reads the
    layer's full-size cotangent g and input. Nothing downstream needs it
    until the optimizer update, so XLA's memory scheduler tends to leave
    every layer's gradient to the end of the backward pass, keeping every
    layer's g alive at once (measured on SmolLM2 under ``nn.remat``: about
    12 MiB a layer at batch 8 × 128, most of the step's temporaries). Adding
    0 · (a first element of each gradient leaf) to x's cotangent makes the
    earlier layers' backward pass depend on it, so each gradient is taken
    while its inputs are alive anyway. The values are unchanged (a NaN in
    the adapter's gradient also reaches x's, where it already makes the
    step's update NaN).
    """
    return x, adapter


def _gradients_first_forward(x, adapter):
    return (x, adapter), None


def _gradients_first_backward(_, cotangents):
    gx, gadapter = cotangents
    firsts = [
        jnp.reshape(leaf, (-1,))[0].astype(jnp.float32)
        for leaf in jax.tree.leaves(gadapter)
        if jnp.issubdtype(leaf.dtype, jnp.inexact) and leaf.size
    ]
    if not firsts:
        return gx, gadapter
    return gx + (sum(firsts) * 0).astype(gx.dtype), gadapter


_gradients_first.defvjp(_gradients_first_forward, _gradients_first_backward)


def _quantized_embed(module: nn.Embed, table: QuantizedKernel, method: str, next_fun, args, kwargs):
    """``nn.Embed`` on a quantized table: its setup skipped (Flax would check
    the blocks' shape against (V, D)), lookups and ``attend`` computed from
    the blocks."""
    if method == "setup":
        return None
    if method == "__call__":  # the looked-up rows, dequantized, in the module's dtype
        rows = quant.embed(args[0] if args else kwargs["inputs"], table)
        return rows.astype(module.dtype or rows.dtype)
    if method == "attend":  # query · tableᵀ, the table read as a (D, V) kernel
        query = args[0] if args else kwargs["query"]
        kernel = table.replace(embedding=False, shape=table.shape[::-1])
        return quant.dense(query, kernel, None, module.dtype, None)
    return next_fun(*args, **kwargs)


def _interceptor(rng: PRNGKeyArray | None):
    def intercept(next_fun, args, kwargs, context):
        module = context.module
        table = _quantized_table(module) if module.scope is not None else None
        if table is not None:
            return _quantized_embed(module, table, context.method_name, next_fun, args, kwargs)
        if context.method_name != "__call__" or module.scope is None or id(module) in _active():
            return next_fun(*args, **kwargs)
        quantized = _quantized_kernel(module)
        if quantized is None and not module.has_variable("params", ADAPTER_KEY):
            return next_fun(*args, **kwargs)
        x = args[0] if args else kwargs["inputs"]
        has_bias = module.has_variable("params", "bias")
        bias = module.get_variable("params", "bias") if has_bias else None
        if quantized is not None:  # the base output from the dequantized weight
            y = quant.dense(x, quantized, bias, module.dtype, module.precision)
        else:
            _active().add(id(module))  # re-entrant calls (super().__call__) see the base
            try:
                y = next_fun(*args, **kwargs)
            finally:
                _active().discard(id(module))
        if not module.has_variable("params", ADAPTER_KEY):
            return y
        adapter = module.get_variable("params", ADAPTER_KEY)
        if not isinstance(adapter, Adapter):
            raise TypeError(f"{path_str(module.path)}: {ADAPTER_KEY!r} is not an Adapter.")
        kernel = module.get_variable("params", "kernel")
        w0 = w_layout(
            kernel if quantized is None else quantized.dequantize(), adapter.kernel_transposed
        )
        _check_orientation(module, adapter, x, w0)
        key = None
        if rng is not None:
            key = jax.random.fold_in(rng, zlib.crc32(path_str(module.path).encode()))
        x, adapter = _gradients_first(x, adapter)
        return adapter(x, y, w0=w0, bias=bias, rng=key)

    return intercept


@contextlib.contextmanager
def adapted(*, rng: PRNGKeyArray | None = None, enabled: bool = True) -> Iterator[None]:
    """Context in which linen modules that carry an adapter use it.

    Args:
        rng: turns on adapter dropout (each module folds in a hash of its
            path); None means deterministic.
        enabled: False makes the context do nothing, for code that serves
            merged and intercepted trees alike (see `inference_params`).

    Example:
        >>> with gl.adapted():  # doctest: +SKIP
        ...     y = module.apply({"params": gl.model_params(params)}, x)
    """
    if not enabled:
        yield
        return
    if rng is not None:
        check_rng(rng, "adapter_rng")
    with nn.intercept_methods(_interceptor(rng)), _guard.adapters_applied():
        yield


def pregenerate(params: Mapping) -> Params:
    """Every generated adapter (GenLoRA) replaced by its `Factors`, computed
    in one batched call per group of adapters of equal config and shapes.

    Per module, GenLoRA's factors are a few dozen tiny ops; a Llama with q/k/v
    targets has ~90 such modules, so generating them inside each module call
    puts ~90 generators in the program. Stacking the adapters of each group
    and `jax.vmap`-ing the generator puts one in it per group
    (on SmolLM2: 2 groups, q and k/v). The result is the same function of the
    adapters' arrays, so gradients flow back to the latents and generators.
    ``apply(..., batch_generators=True)`` does this; call it yourself when you
    enter `adapted` directly: ``model(..., params=model_params(pregenerate(params)))``.
    Measured on SmolLM2 (CPU, BENCHMARKS.md), it does not pay, so it is
    opt-in: at r = 8 step time is unchanged within noise and peak RSS 12 %
    higher; at r = 64 the step is 1.079 × (1.060–1.097) LoRA r = 64's with
    batching and 0.998 × (0.985–1.012) without (`benchmarks.paired`).

    Args:
        params: a wrapped tree (or `model_params` of one).

    Returns:
        The tree with `Factors` in place of generated adapters; other leaves
        unchanged.
    """
    leaves = flat(params)
    groups: dict[tuple, list[tuple]] = collections.defaultdict(list)
    for key, leaf in leaves.items():
        if is_adapter(key, leaf) and isinstance(leaf, LowRankAdapter) and leaf.generated:
            kernel = leaves.get((*key[:-1], "kernel"))
            layer_axes = 0 if kernel is None else kernel.ndim - 2
            shapes = tuple((x.shape, x.dtype) for x in jax.tree.leaves(leaf))
            groups[(jax.tree.structure(leaf), shapes, layer_axes)].append(key)
    for (_, _, layer_axes), keys in groups.items():
        nodes = [leaves[key] for key in keys]
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *nodes)
        generate = lambda adapter: adapter.factors()
        for _ in range(layer_axes + 1):
            generate = jax.vmap(generate)
        b, a = generate(stacked)
        for i, (key, node) in enumerate(zip(keys, nodes, strict=True)):
            leaves[key] = Factors(
                config=node.config, kernel_transposed=node.kernel_transposed, a=a[i], b=b[i]
            )
    return unflat(leaves)


def apply(
    model: Any,
    params: dict,
    *args: Any,
    adapter_rng: PRNGKeyArray | None = None,
    batch_generators: bool = False,
    **kwargs: Any,
) -> Any:
    """Calls ``model`` with adapted ``params``.

    Args:
        model: a `transformers` Flax model (called as ``model(*args,
            params=..., **kwargs)``) or a `flax.linen.Module` (called as
            ``model.apply({"params": ...}, *args, **kwargs)``).
        params: a tree returned by `wrap` (or `join`).
        *args: model inputs.
        adapter_rng: enables adapter dropout; None for evaluation.
        batch_generators: compute generated factors (GenLoRA) for all modules
            in one batched call per group (`pregenerate`) instead of inside
            each module call: the same numbers and a smaller program, but on
            SmolLM2 (CPU, batch 8 × 128) no faster step or compile, and 12 %
            more peak memory (all factors live at once), so off by default.
        **kwargs: passed to the model (``attention_mask``, ``train``,
            ``dropout_rng`` for the model's own dropout, ...).

    Returns:
        Whatever the model returns.
    """
    tree = model_params(pregenerate(params) if batch_generators else params)
    with adapted(rng=adapter_rng):
        if isinstance(model, nn.Module):
            return model.apply({"params": tree}, *args, **kwargs)
        return model(*args, params=tree, **kwargs)
