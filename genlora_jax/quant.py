"""A frozen base kept in 4- or 8-bit blocks (QLoRA-style), dequantized inside the step.

The frozen kernels of a model are most of its memory, and they never train. A
`QuantizedKernel` keeps one of them in a block format and stands in the tree
where the float kernel stood; `genlora_jax.apply` computes those modules'
outputs from the dequantized weight (`dense`), which exists only while a
matmul needs it: the backward pass dequantizes it again instead of keeping a
float copy of every layer.
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
        shape: the array's shape as Flax stores it (static): (n, m) = Wᵀ for
            a kernel, (m, n) = W for an embedding table.
        dtype: the dtype `dequantize` returns (static).
        embedding: True for an ``nn.Embed`` table (V, D), whose rows are
            looked up (`embed`) rather than multiplied (static).
    """

    codes: Array
    scales: Array
    offsets: Array | None
    kind: str = struct.field(pytree_node=False)
    shape: tuple[int, ...] = struct.field(pytree_node=False)
    dtype: Any = struct.field(pytree_node=False, default=jnp.dtype(jnp.float32))
    embedding: bool = struct.field(pytree_node=False, default=False)

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

    def dequantize(self) -> Float[Array, "n m"] | Float[Array, "m n"]:
        """The array as Flax stores it, in ``dtype``: a kernel (n, m) = Wᵀ, an
        embedding table (m, n) = W."""
        w = self.weight()
        return (w if self.embedding else w.T).astype(self.dtype)

    def rows(self, start: int | Array, size: int) -> QuantizedKernel:
        """Rows [start, start + size) of W (``start`` may be traced), as a
        kernel (n, size): the blocks sliced, not dequantized."""
        piece = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, size), self)
        return piece.replace(shape=(self.shape[0], size))

    def as_embedding(self) -> QuantizedKernel:
        """The same blocks (shared, not copied) read as an embedding table
        (m, n) = W: a tied head's kernel doubles as the input embedding."""
        return self.replace(embedding=True, shape=self.shape[::-1])


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


def _dense(x, w, bias, dtype, precision):
    """x Wᵀ + b in ``dtype``, W (m, n) as `QuantizedKernel.weight` gives it."""
    dtype = dtype or jnp.result_type(x, w)
    y = jax.lax.dot_general(
        x.astype(dtype), w.astype(dtype), (((x.ndim - 1,), (1,)), ((), ())), precision=precision
    )
    if bias is None:
        return y
    return y + jnp.reshape(bias.astype(dtype), (1,) * (y.ndim - 1) + bias.shape)


def weight_after(kernel: QuantizedKernel, anchor: Array) -> Float[Array, "m n"]:
    """W dequantized from blocks made to depend on ``anchor``, so that XLA can
    neither compute it before ``anchor`` exists nor merge it with another
    dequantization of the same blocks. Common-subexpression elimination
    would otherwise keep one float W (or its decoded codes) alive from the
    forward pass to the backward, for every layer at once; on CPU,
    `jax.lax.optimization_barrier` does not stop that (measured: with a
    barrier, the backward pass still read the forward pass's W).

    The dependence is a zero XLA cannot fold: ``anchor``'s first element
    times 0 (not folded for floats, as it is NaN for NaN), converted to the
    codes' integer type (XLA converts NaN and ±inf·0 to 0), added to the
    codes. The codes are unchanged."""
    if not jnp.size(anchor):  # nothing to compute from, nothing to share
        return kernel.weight().astype(kernel.dtype)
    tie = (jnp.reshape(anchor, (-1,))[0].astype(jnp.float32) * 0).astype(kernel.codes.dtype)
    kernel = kernel.replace(codes=kernel.codes + tie)
    return kernel.weight().astype(kernel.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def dense(
    x: Float[Array, "*batch n"],
    kernel: QuantizedKernel,
    bias: Float[Array, " m"] | None,
    dtype: Any,
    precision: Any,
) -> Float[Array, "*batch m"]:
    """``nn.Dense`` on a quantized kernel: x Wᵀ + b in ``dtype``.

    Float W exists only while a matmul needs it: the forward pass dequantizes
    it after ``x`` is ready, the backward pass dequantizes it again after the
    output's cotangent is ready (`jax.custom_vjp`; saved between the two: x
    and the blocks). Without `weight_after`'s tie to ``x`` and to the
    cotangent, XLA merges the two dequantizations and keeps every layer's
    float W for the whole step, under `jax.checkpoint` or not. The
    gradients with respect to ``x`` and ``bias`` are exact; so are those
    with respect to the float scales and offsets (through W); the integer
    codes get none. When the base is frozen, the last two are unused and
    compiled away.
    """
    return _dense(x, kernel.weight().astype(kernel.dtype), bias, dtype, precision)


def _dense_forward(x, kernel, bias, dtype, precision):
    y = _dense(x, weight_after(kernel, x), bias, dtype, precision)
    return y, (x, kernel, bias)


def _dense_backward(dtype, precision, saved, g):
    x, kernel, bias = saved
    w = weight_after(kernel, g)
    dtype = dtype or jnp.result_type(x, w)
    g = g.astype(dtype)
    dx = jax.lax.dot_general(g, w.astype(dtype), (((g.ndim - 1,), (0,)), ((), ())), precision)
    batch = tuple(range(g.ndim - 1))
    # dL/dW (m, n) = gᵀ x, then through W = weight(blocks) to the float leaves
    dw = jax.lax.dot_general(
        g, x.astype(dtype), ((batch, batch), ((), ())), precision=precision
    ).astype(jnp.float32)
    _, weight_vjp = jax.vjp(lambda k: k.weight(), kernel)
    (dkernel,) = weight_vjp(dw)
    dbias = None if bias is None else jnp.sum(g, axis=batch).astype(bias.dtype)
    return dx.astype(x.dtype), dkernel, dbias


dense.defvjp(_dense_forward, _dense_backward)


SLICE_BYTES = 16 * 2**20
"""`dense_in_slices` keeps each dequantized slice of W under this many bytes."""


def dense_in_slices(
    x: Float[Array, "*batch n"], kernel: QuantizedKernel, dtype: Any = None
) -> Float[Array, "*batch m"]:
    """`dense` (no bias) with W dequantized a slice of rows at a time.

    For a wide kernel, such as a language model's head (D, V), the float W
    is much larger than one call's output: SmolLM2's is 108 MiB against
    24 MiB of logits for 128 tokens. Here W's m rows are cut into the
    fewest equal slices of at most `SLICE_BYTES` each (`slice_plan`; the
    last may overlap the one before, whose columns it then drops), and
    `jax.lax.map` runs `dense` on one slice after the other, forward and
    backward, so no more than one slice is float at a time. Same arithmetic
    as `dense`, column by column; a kernel that fits one slice is `dense`.

    Args:
        x: (..., n) inputs.
        kernel: a (n, m) `QuantizedKernel`.
        dtype: the compute dtype; None takes x's and the kernel's.

    Returns:
        (..., m).
    """
    m = kernel.codes.shape[0]
    n = kernel.shape[0]
    count, size = slice_plan(m, max(SLICE_BYTES // (4 * n), 1))
    if count == 1:
        return dense(x, kernel, None, dtype, None)
    ys = jax.lax.map(  # (S, ..., size); the last slice may overlap the one before
        lambda start: dense(x, kernel.rows(start, size), None, dtype, None),
        slice_starts(m, count, size),
    )
    overlap = count * size - m
    head = jnp.moveaxis(ys[:-1], 0, -2).reshape(*x.shape[:-1], (count - 1) * size)
    return jnp.concatenate([head, ys[-1][..., overlap:]], axis=-1)


def slice_plan(total: int, most: int) -> tuple[int, int]:
    """(count, size): the fewest slices of at most ``most`` rows that cover
    ``total`` rows, all of one size; the last starts at ``total - size`` and
    may overlap the one before (`dense_in_slices`, the loss by vocabulary
    slices)."""
    count = -(-total // max(most, 1))
    return count, -(-total // count)


def slice_starts(total: int, count: int, size: int) -> Array:
    """(count,) int: where each slice of `slice_plan` starts, the last one at
    ``total - size`` (early, overlapping the one before, when size does not
    divide total)."""
    return jnp.asarray([min(i * size, total - size) for i in range(count)])


def embed(ids: Array, table: QuantizedKernel) -> Float[Array, "*ids n"]:
    """``nn.Embed`` on a quantized table: the rows ``ids`` of W, dequantized.

    Only the looked-up rows' blocks are gathered and dequantized, so a
    training step never holds the float table (V, D).

    Args:
        ids: int token ids, any shape.
        table: an embedding `QuantizedKernel` (``embedding=True``), (V, D).

    Returns:
        ids.shape + (D,) in ``table.dtype``.
    """
    flat_ids = jnp.reshape(ids, (-1,))
    picked = jax.tree.map(lambda a: jnp.take(a, flat_ids, axis=0), table)
    return picked.weight().astype(table.dtype).reshape(*jnp.shape(ids), -1)


def nbytes(params: Mapping) -> int:
    """Bytes of every array in ``params`` (quantized kernels at their packed
    size; an array that two leaves share, such as a tied head's blocks, once)."""
    unique = {id(x): x for x in jax.tree.leaves(params)}.values()
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in unique)
