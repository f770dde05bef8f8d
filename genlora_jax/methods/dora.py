"""DoRA (Liu et al. 2024): a learned magnitude times the direction of W0 + s · B A.

Weight-Decomposed Low-Rank Adaptation, arXiv 2402.09353. The adapted weight is

    V  = W0 + s · B A                     (m, n)
    W' = m_vec ⊙ V / ‖V‖                  ‖V‖: the norm of each output row, (m,)

and, as in PEFT, ‖V‖ is treated as a constant in the backward pass
(`jax.lax.stop_gradient`), which the paper recommends to save memory.

Parameterisation. `AdapterConfig.init` does not see W0, so the magnitude is
stored as an offset from the row norms of W0: m_vec = ‖W0‖ + ``magnitude``,
with ``magnitude`` = 0 at init (PEFT's m_vec = ‖W0‖). The gradient with respect
to the offset equals the gradient with respect to m_vec, so any optimizer
follows PEFT's trajectory exactly; only decoupled weight decay differs (here it
pulls m_vec towards ‖W0‖ rather than towards 0). Trainable per (m × n)
projection: r·(m + n) + m.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from genlora_jax.methods.base import (
    Adapter,
    AdapterConfig,
    input_dropout,
    lora_factors,
    low_rank_delta,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DoRAConfig(AdapterConfig):
    """DoRA: LoRA's A, B and init (A Kaiming-uniform, B = 0) plus a magnitude (m,)."""

    method: ClassVar[str] = "dora"

    def init(self, rng, *, m, n, kernel_transposed, path):
        a, b = lora_factors(rng, rank=self.rank, m=m, n=n)
        return DoRAParams(
            config=self,
            kernel_transposed=kernel_transposed,
            a=a,
            b=b,
            magnitude=jnp.zeros((m,), jnp.float32),
        )

    def from_lora(self, tensors, *, w0, kernel_transposed):
        """PEFT stores m_vec itself; the offset kept here is m_vec − ‖W0‖."""
        a, b, m_vec = (
            jnp.asarray(tensors[k], jnp.float32)
            for k in ("lora_A", "lora_B", "lora_magnitude_vector")
        )
        return DoRAParams(
            config=self,
            kernel_transposed=kernel_transposed,
            a=a,
            b=b,
            magnitude=m_vec - row_norm(w0),
        )


def row_norm(w: Float[Array, "m n"]) -> Float[Array, " m"]:
    """‖w_i‖₂ of every output row i: DoRA's m_vec at init is ``row_norm(W0)``."""
    return jnp.sqrt(jnp.sum(jnp.square(w), axis=1))


class DoRAParams(Adapter):
    """DoRA state of one projection.

    Attributes:
        a: A, shape (r, n).
        b: B, shape (m, r).
        magnitude: m_vec − ‖W0‖ (per output row), shape (m,); 0 at init.
    """

    a: Float[Array, "r n"]
    b: Float[Array, "m r"]
    magnitude: Float[Array, " m"]

    peft_use_dora: ClassVar[bool] = True

    def to_lora(self, w0: Float[Array, "m n"]) -> dict[str, Array]:
        """LoRA's factors plus PEFT's magnitude vector m_vec = ‖W0‖ + offset."""
        return {"lora_A": self.a, "lora_B": self.b, "lora_magnitude_vector": self.m_vec(w0)}

    def m_vec(self, w0: Float[Array, "m n"]) -> Float[Array, " m"]:
        """DoRA's magnitude vector, ‖W0‖ + ``magnitude``."""
        return row_norm(w0.astype(jnp.float32)) + self.magnitude

    def _direction_and_shift(
        self, w0: Float[Array, "m n"]
    ) -> tuple[Float[Array, "m n"], Float[Array, " m"]]:
        """V = W0 + ΔW (ΔW = s·B A) and c − 1, where c = m_vec / ‖V‖, in float32.

        With d = ‖V‖² − ‖W0‖² = Σ_j ΔW ⊙ (2 W0 + ΔW), c − 1 is computed as
        (offset − d / (‖W0‖ + ‖V‖)) / ‖V‖: the same number, free of the
        cancellation in ‖W0‖ − ‖V‖, and exactly 0 at init (offset = 0, ΔW = 0)
        so the adapted layer is bit-identical to the base layer. ‖V‖ and d
        are detached: only the magnitude receives a gradient through c.
        """
        w0 = w0.astype(jnp.float32)
        dw = low_rank_delta(self.b, self.a, self.config.scale)
        v = w0 + dw
        v_norm = jax.lax.stop_gradient(row_norm(v))
        d = jax.lax.stop_gradient(jnp.sum(dw * (2.0 * w0 + dw), axis=1))
        return v, (self.magnitude - d / (row_norm(w0) + v_norm)) / v_norm

    def merged_weight(self, w0: Float[Array, "m n"]) -> Float[Array, "m n"]:
        """W' = m_vec ⊙ V / ‖V‖."""
        v, shift = self._direction_and_shift(w0)
        return v + shift[:, None] * v

    def delta_weight(self, w0: Float[Array, "m n"]) -> Float[Array, "m n"]:
        return self.merged_weight(w0) - w0

    def unmerged_weight(self, w: Float[Array, "m n"]) -> Float[Array, "m n"]:
        raise NotImplementedError(
            "DoRA cannot recover W0 from a merged weight: W' = m_vec ⊙ V/‖V‖ loses the row "
            "norms of V. Keep the base kernels (`genlora_jax.split`) instead of unmerging."
        )

    def __call__(self, x, y, *, w0, bias, rng):
        """PEFT's forward, without forming W': with c = m_vec/‖V‖ and x̃ = dropout(x),

        y' = y + (c − 1) ⊙ W0 x̃ + c ⊙ s · B A x̃,

        where W0 x̃ = y − b when dropout is off (no extra matmul).
        """
        shift = self._direction_and_shift(w0)[1]
        x_drop = input_dropout(x, self.config.dropout, rng)
        if rng is None or self.config.dropout == 0.0:
            base = y if bias is None else y - jnp.broadcast_to(bias.astype(y.dtype), y.shape)
        else:
            base = x_drop @ w0.T.astype(x.dtype)
        h = x_drop @ self.a.T.astype(x.dtype)
        lora = (h @ (self.config.scale * self.b).T.astype(h.dtype)).astype(y.dtype)
        shift, c = (jnp.broadcast_to(v.astype(y.dtype), y.shape) for v in (shift, 1.0 + shift))
        return y + shift * base + c * lora
