"""Mixed precision: a low-precision frozen base under float32 adapters.

The policy, and where each part of it lives:

- base weights in bfloat16 (or float16): `cast_base`, applied once to the
  wrapped tree; the model's own ``dtype=`` sets the activations' dtype;
- adapter leaves, extra trainable leaves and hence gradients and optimizer
  state stay float32 (`cast_base` leaves everything under a ``"genlora"`` key
  alone, and ``tx.init`` copies their dtype);
- the RBF generator computes in float32 (`generate_basis` casts θ and z), the
  low-rank branch runs in the activations' dtype (A and B are cast to it);
- `merge` forms W0 + ΔW in float32 and casts it to the base kernel's dtype, so
  a bfloat16 base exports bfloat16 kernels.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
from jaxtyping import DTypeLike

from genlora_jax._tree import Params, flat, is_adapter_state, unflat
from genlora_jax.quant import QuantizedKernel


def cast_base(params: Mapping, dtype: DTypeLike = jnp.bfloat16) -> Params:
    """``params`` with every floating-point base leaf cast to ``dtype``.

    Adapters and extra trainable leaves (everything under a ``"genlora"``
    key) and non-float leaves keep their dtype, so the trainable half of
    `split` and the optimizer state built from it stay float32.

    Args:
        params: a wrapped tree (or a plain base tree).
        dtype: the storage dtype of the frozen base, e.g. ``jnp.bfloat16``.

    Returns:
        A tree of the same structure.

    Example:
        >>> import jax.numpy as jnp, genlora_jax as gl
        >>> base = {"q": {"kernel": jnp.ones((32, 16)), "bias": jnp.zeros(16)}}
        >>> p = gl.cast_base(gl.wrap(base, ["q"], gl.LoRAConfig(rank=2)))
        >>> p["q"]["kernel"].dtype, p["q"]["genlora"].a.dtype
        (dtype(bfloat16), dtype('float32'))
    """
    out = {}
    for key, leaf in flat(params).items():
        if isinstance(leaf, QuantizedKernel):  # stays packed; dequantizes to ``dtype``
            leaf = leaf.replace(dtype=jnp.dtype(dtype))
        elif not is_adapter_state(key) and jnp.issubdtype(leaf.dtype, jnp.floating):
            leaf = leaf.astype(dtype)
        out[key] = leaf
    return unflat(out)
