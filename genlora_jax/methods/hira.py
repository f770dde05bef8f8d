"""HiRA (Huang et al. 2025): a Hadamard product of W0 with a low-rank matrix.

Hadamard High-Rank Adaptation, ICLR 2025. The update is

    ΔW = W0 ⊙ (B A),        y = (W0 ⊙ (1 + B A)) x + b,

whose rank is not bounded by r (rank(W0 ⊙ BA) ≤ rank(W0) · r). As written in
BASELINES.md there is no α/r: the config has no scale (``scale`` is 1), and
setting ``alpha`` or ``rslora`` is an error. A and B are initialised as LoRA's
(A Kaiming-uniform, B = 0), so ΔW = 0 at step 0. Trainable per (m × n)
projection: r·(m + n), as LoRA. The forward forms ΔW (m × n) once per call,
which LoRA never does: its cost grows with m·n·r, not with the token count.

Dropout: HiRA's official forward applies neither dropout nor a scale to the
ΔW x branch, so neither does this one by default (``dropout`` must stay 0);
``dropout_on_update=True`` is a named departure that drops the input of that
branch as LoRA does.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
from jaxtyping import Array, Float

from genlora_jax.methods.base import Adapter, AdapterConfig, input_dropout, lora_factors


@dataclasses.dataclass(frozen=True, kw_only=True)
class HiRAConfig(AdapterConfig):
    """HiRA: A (r, n), B (m, r) with LoRA's init; ΔW = W0 ⊙ (B A), no scale.

    Attributes:
        dropout_on_update: apply ``dropout`` to the input of the ΔW x branch
            (not in the original HiRA, whose forward has no dropout there).
    """

    method: ClassVar[str] = "hira"

    dropout_on_update: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dropout and not self.dropout_on_update:
            raise ValueError(
                f"HiRA's original forward has no dropout on its update, got "
                f"dropout={self.dropout}; leave dropout=0, or pass dropout_on_update=True to "
                "drop the input of the ΔW x branch anyway (a departure from HiRA)."
            )
        if self.alpha is not None or self.rslora:
            raise ValueError(
                f"HiRA has no α/r scale (ΔW = W0 ⊙ BA), got alpha={self.alpha}, "
                f"rslora={self.rslora}; leave alpha=None and rslora=False."
            )

    @property
    def scale(self) -> float:
        """1: HiRA's update is not scaled."""
        return 1.0

    def init(self, rng, *, m, n, kernel_transposed, path):
        a, b = lora_factors(rng, rank=self.rank, m=m, n=n)
        return HiRAParams(config=self, kernel_transposed=kernel_transposed, a=a, b=b)


class HiRAParams(Adapter):
    """HiRA factors of one projection. Attributes: a (r, n), b (m, r)."""

    a: Float[Array, "r n"]
    b: Float[Array, "m r"]

    def delta_weight(self, w0: Float[Array, "m n"]) -> Float[Array, "m n"]:
        """ΔW = W0 ⊙ (B A), in float32."""
        return w0.astype(jnp.float32) * (self.b @ self.a)

    def unmerged_weight(self, w: Float[Array, "m n"]) -> Float[Array, "m n"]:
        """W0 = W / (1 + B A).

        Exact in real arithmetic; in float32 each entry's relative error is
        about ε_W / |1 + (BA)_ij|, where ε_W is the relative rounding of the
        merged (and possibly lower-precision) kernel. Harmless while |BA| ≪ 1,
        as after ordinary fine-tuning; entries with 1 + (BA)_ij near 0 are
        lost (W0_ij was multiplied by about 0 on merge) and come back inf/NaN.
        """
        return w / (1.0 + self.b @ self.a)

    def __call__(self, x, y, *, w0, bias, rng):
        x_drop = input_dropout(x, self.config.dropout, rng)
        return y + (x_drop @ self.delta_weight(w0).T.astype(x.dtype)).astype(y.dtype)
