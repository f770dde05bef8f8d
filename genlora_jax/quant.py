"""A frozen base kept in 4- or 8-bit blocks (QLoRA-style), dequantized inside the step.

The frozen kernels of a model are most of its memory, and they never train. A
`QuantizedKernel` keeps one of them in a block format and stands in the tree
where the float kernel stood; `genlora_jax.apply` computes those modules'
outputs from the dequantized weight, under `jax.checkpoint`, so the backward
pass recomputes the weight instead of keeping a float copy of every layer.
Adapters and optimizer state stay float32.

Formats (values per block; W = the (m, n) weight, blocks run along n):

- ``"q4_1"`` (GGUF/llama.cpp): 32 values, w = d·q + m, q ∈ 0..15, d and m f16.
- ``"q8_0"`` (GGUF): 32 values, w = d·q, q ∈ −128..127, d f16.
- ``"nf4"`` (QLoRA, Dettmers et al. 2023): 64 values, w = absmax·NF4[q],
  the 16 quantiles of a normal distribution, absmax float32.

`quantize_base` turns any Flax tree's 2-D kernels into NF4; GGUF files keep
their own blocks with ``genlora_jax.models.load_gguf(..., quantized=True)``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jaxtyping import Array, Float

from genlora_jax._select import GPT2_CONV1D, is_transposed
from genlora_jax._tree import Params, flat, is_adapter_state, unflat

BLOCK = {"q4_1": 32, "q8_0": 32, "nf4": 64}
# QLoRA's NormalFloat4 code book (bitsandbytes' values).
NF4 = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)


class QuantizedKernel(struct.PyTreeNode):
    """A frozen kernel in blocks; `dequantize` gives it back as stored by Flax.

    Attributes:
        codes: uint8 (m, n / block, bytes): packed 4-bit codes (two per byte:
            byte j holds value j in its low nibble and value j + block/2 in
            its high nibble) or int8 codes viewed as uint8 (``q8_0``).
        scales: float32 (m, n / block): d, or absmax for NF4.
        offsets: float32 (m, n / block): Q4_1's m; None for the others.
        kind: "q4_1", "q8_0" or "nf4" (static).
        shape: the kernel's shape as Flax stores it, (n, m) (static).
        dtype: the dtype `dequantize` returns (static).
    """

    codes: Array
    scales: Array
    offsets: Array | None
    kind: str = struct.field(pytree_node=False)
    shape: tuple[int, ...] = struct.field(pytree_node=False)
    dtype: Any = struct.field(pytree_node=False, default=jnp.dtype(jnp.float32))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def weight(self) -> Float[Array, "m n"]:
        """W (m, n) in float32, block by block."""
        m = self.codes.shape[0]
        if self.kind == "q8_0":
            q = jax.lax.bitcast_convert_type(self.codes, jnp.int8).astype(jnp.float32)
            return (q * self.scales[..., None]).reshape(m, -1)
        low, high = self.codes & 0x0F, self.codes >> 4
        q = jnp.concatenate([low, high], axis=-1)  # (m, blocks, block)
        if self.kind == "q4_1":
            values = q.astype(jnp.float32) * self.scales[..., None] + self.offsets[..., None]
        else:
            values = jnp.asarray(NF4)[q] * self.scales[..., None]
        return values.reshape(m, -1)

    def dequantize(self) -> Float[Array, "n m"]:
        """The kernel (n, m) = Wᵀ in ``dtype``."""
        return self.weight().T.astype(self.dtype)


def from_gguf_blocks(
    raw: np.ndarray, kind: str, shape: tuple[int, int], dtype: Any = jnp.float32
) -> QuantizedKernel:
    """A kernel from a GGUF tensor's raw blocks, kept as they are.

    Args:
        raw: uint8 (m, n / 32 · bytes per block): the tensor's data, one row of
            W (torch's (out, in) order) per row, as `gguf.GGUFReader` gives it.
        kind: "q4_1" or "q8_0".
        shape: the Flax kernel shape (n, m).
        dtype: what `QuantizedKernel.dequantize` returns.
    """
    n, m = shape
    per_block = {"q4_1": 20, "q8_0": 34}[kind]
    blocks = np.asarray(raw, np.uint8).reshape(m, n // BLOCK[kind], per_block)
    scales = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if kind == "q8_0":
        return QuantizedKernel(
            codes=jnp.asarray(blocks[..., 2:]),
            scales=jnp.asarray(scales),
            offsets=None,
            kind=kind,
            shape=shape,
            dtype=jnp.dtype(dtype),
        )
    offsets = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    return QuantizedKernel(
        codes=jnp.asarray(blocks[..., 4:]),
        scales=jnp.asarray(scales),
        offsets=jnp.asarray(offsets),
        kind=kind,
        shape=shape,
        dtype=jnp.dtype(dtype),
    )


def quantize_nf4(kernel: Array, *, dtype: Any = None) -> QuantizedKernel:
    """NF4 of a Flax kernel (n, m): blocks of 64 along n, absmax scales.

    Raises:
        ValueError: n is not a multiple of 64.
    """
    n, m = kernel.shape
    if n % BLOCK["nf4"]:
        raise ValueError(f"NF4 needs the input size n={n} to be a multiple of {BLOCK['nf4']}.")
    w = jnp.asarray(kernel, jnp.float32).T.reshape(m, n // BLOCK["nf4"], BLOCK["nf4"])
    absmax = jnp.max(jnp.abs(w), axis=-1)
    normed = w / jnp.where(absmax == 0, 1.0, absmax)[..., None]
    # the nearest code (the lower one on a tie): search the midpoints between codes,
    # rather than comparing every value with all 16 codes (16x the kernel in memory)
    midpoints = jnp.asarray((NF4[1:] + NF4[:-1]) / 2)
    q = jnp.searchsorted(midpoints, normed, side="left").astype(jnp.uint8)
    half = BLOCK["nf4"] // 2
    codes = q[..., :half] | (q[..., half:] << 4)
    return QuantizedKernel(
        codes=codes,
        scales=absmax,
        offsets=None,
        kind="nf4",
        shape=(n, m),
        dtype=jnp.dtype(kernel.dtype if dtype is None else dtype),
    )


def quantize_base(params: Mapping, kind: str = "nf4", *, skip: tuple[str, ...] = ()) -> Params:
    """Every frozen 2-D kernel whose input size NF4 divides, as a `QuantizedKernel`.

    Adapter state and extra trainable leaves stay as they are; so do kernels
    whose input size is not a multiple of 64 (reported in the returned tree's
    unchanged leaves) and modules whose path contains a name in ``skip``
    (e.g. ``("lm_head",)``). GPT-2-style ``Conv1D`` kernels (stored (m, n))
    are left in float too.

    Args:
        params: a base tree or a wrapped one.
        kind: only "nf4" (GGUF files keep their own formats via `load_gguf`).
        skip: module names left in float.

    Returns:
        The tree with quantized kernels; call the model through
        `genlora_jax.apply`, which dequantizes them.
    """
    if kind != "nf4":
        raise ValueError(
            f"quantize_base makes NF4 only, got kind={kind!r}; GGUF files keep their Q4_1/Q8_0 "
            "blocks with genlora_jax.models.load_gguf(path, quantized=True)."
        )
    out = {}
    for key, leaf in flat(params).items():
        if (
            key[-1] == "kernel"
            and not isinstance(leaf, QuantizedKernel)
            and not is_transposed(GPT2_CONV1D, key[:-1])
            and not is_adapter_state(key)
            and getattr(leaf, "ndim", 0) == 2
            and leaf.shape[0] % BLOCK["nf4"] == 0
            and not any(name in key for name in skip)
        ):
            leaf = quantize_nf4(leaf)
        out[key] = leaf
    from genlora_jax import _guard  # the guard knows this module's class

    _guard.install()
    return unflat(out)


def dequantize_base(params: Mapping) -> Params:
    """Every `QuantizedKernel` of ``params`` replaced by its dequantized kernel."""
    return unflat(
        {
            key: leaf.dequantize() if isinstance(leaf, QuantizedKernel) else leaf
            for key, leaf in flat(params).items()
        }
    )


@functools.partial(jax.checkpoint, static_argnums=(3, 4))
def dense(
    x: Float[Array, "*batch n"],
    kernel: QuantizedKernel,
    bias: Float[Array, " m"] | None,
    dtype: Any,
    precision: Any,
) -> Float[Array, "*batch m"]:
    """``nn.Dense`` on a quantized kernel: x Wᵀ + b in ``dtype``.

    Under `jax.checkpoint`, so the backward pass recomputes W from the blocks
    rather than saving a float copy of it.
    """
    w = kernel.dequantize()
    dtype = dtype or jnp.result_type(x, kernel.dtype)
    y = jax.lax.dot_general(
        x.astype(dtype),
        w.astype(dtype),
        (((x.ndim - 1,), (0,)), ((), ())),
        precision=precision,
    )
    if bias is None:
        return y
    return y + jnp.reshape(bias.astype(dtype), (1,) * (y.ndim - 1) + bias.shape)


def nbytes(params: Mapping) -> int:
    """Bytes of every array in ``params`` (quantized kernels at their packed size)."""
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))
