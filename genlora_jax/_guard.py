"""The guard that makes a forgotten `genlora_jax.apply` loud.

Adapters sit beside their kernels in the parameter tree, and a Flax module
only reads the variables it declares: called directly on a wrapped tree
(``model(ids, params=wrapped)``, ``module.apply({"params": wrapped}, x)``), a
model would silently return the *base* output. Once a process has built a
wrapped tree, this module keeps a method interceptor at the bottom of the
thread's interceptor stack that raises when a module holding an adapter runs
``__call__`` outside `genlora_jax.adapted` (which `genlora_jax.apply` enters).

The guard costs one Python check per module call while tracing (nothing in
compiled code). It is installed per thread, only when no other interceptor is
active, so it never breaks another ``intercept_methods`` context's stack order.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import flax.linen as nn

from genlora_jax._tree import ADAPTER_KEY
from genlora_jax.quant import QuantizedKernel

_STATE = threading.local()


class AdapterNotAppliedError(RuntimeError):
    """A module holding an adapter was called without the adapter applied."""


def _depth() -> int:
    return getattr(_STATE, "depth", 0)


@contextlib.contextmanager
def adapters_applied() -> Iterator[None]:
    """Marks the enclosed module calls as deliberate (the interceptor is active)."""
    _STATE.depth = _depth() + 1
    try:
        yield
    finally:
        _STATE.depth -= 1


def _guard(next_fun, args, kwargs, context):
    module = context.module
    if (
        context.method_name == "__call__"
        and _depth() == 0
        and module.scope is not None
        and module.has_variable("params", ADAPTER_KEY)
    ):
        path = "/".join(str(p) for p in module.path)
        raise AdapterNotAppliedError(
            f"{path} holds a genlora_jax adapter, but the model was called without it, "
            "which would silently compute the base model. Call `genlora_jax.apply(model, "
            "params, ...)` (or the model inside `with genlora_jax.adapted():`), or merge "
            "first: `model(..., params=genlora_jax.merge(params))`. For the base model alone "
            "pass `genlora_jax.split(params)[0]`."
        )
    if (
        # an nn.Embed's setup checks the table's shape, before any __call__
        context.method_name in ("__call__", "setup")
        and _depth() == 0
        and module.scope is not None
        and any(
            module.has_variable("params", name)
            and isinstance(module.get_variable("params", name), QuantizedKernel)
            for name in ("kernel", "embedding")
        )
    ):
        path = "/".join(str(p) for p in module.path)
        raise AdapterNotAppliedError(
            f"{path} holds a quantized kernel or table, which the model cannot use by itself. Call "
            "`genlora_jax.apply(model, params, ...)` (it dequantizes), or dequantize first: "
            "`genlora_jax.quant.dequantize_base(params)`."
        )
    return next_fun(*args, **kwargs)


def install() -> None:
    """Puts the guard under this thread's interceptors (idempotent).

    Skipped while any other interceptor is active: pushing under a running
    ``intercept_methods`` context would break its stack order. The next
    call made outside such a context installs it.
    """
    if getattr(_STATE, "installed", False):
        return
    stack = getattr(nn.module, "_global_interceptor_stack", None)
    if stack is None or len(stack):
        return
    # Pushed for good (not through the `intercept_methods` context, whose exit
    # would pop it again when the thread's state is collected).
    stack.push(_guard)
    _STATE.installed = True
