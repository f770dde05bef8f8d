"""MELoRA (Ren et al. 2024): k mini-LoRAs on a block diagonal.

"MELoRA: Mini-Ensemble Low-Rank Adapters for Parameter-Efficient Fine-Tuning",
ACL 2024, arXiv 2402.17263. The input x (n) and output (m) are cut into k
equal chunks; mini-LoRA i maps input chunk i to output chunk i with rank r_m:

    ΔW = blockdiag(s · B_1 A_1, …, s · B_k A_k),   B_i (m/k, r_m), A_i (r_m, n/k),

a rank-(k·r_m) update with r_m·(m + n) parameters (LoRA at rank k·r_m has k
times more). ``rank`` is the total rank k·r_m and s = α/rank, so the scale
means what it means for LoRA at the same rank. Each mini is initialised as a
LoRA of its chunk (A_i Kaiming-uniform with fan-in n/k, B_i = 0).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from genlora_jax._adapter import (
    AdapterConfig,
    LowRankAdapter,
    check_int,
    input_dropout,
    kaiming_uniform,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MELoRAConfig(AdapterConfig):
    """MELoRA hyper-parameters (paper setting: rank 8 with 4 minis).

    Attributes:
        mini: k, the number of mini-LoRAs; must divide ``rank`` and both m
            and n of every targeted projection. Each mini has rank rank / k.
    """

    method: ClassVar[str] = "melora"

    mini: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "mini", minimum=1)
        if self.rank % self.mini:
            raise ValueError(
                f"mini={self.mini} must be a positive divisor of rank={self.rank} (the total "
                "rank is mini · per-mini rank); e.g. rank=8, mini=4 gives 4 minis of rank 2."
            )

    def init(self, rng, *, m, n, kernel_transposed, path):
        k = self.mini
        if m % k or n % k:
            fits = [d for d in range(1, 65) if m % d == 0 and n % d == 0 and self.rank % d == 0]
            raise ValueError(
                f"{path}: mini={k} does not divide both its out size m={m} and in size n={n}. "
                f"Choose mini from {fits}, or give this module its own mini via "
                "overrides={pattern: {'mini': k}}."
            )
        r_mini = self.rank // k
        return MELoRAParams(
            config=self,
            kernel_transposed=kernel_transposed,
            a=kaiming_uniform(rng, (k, r_mini, n // k), fan_in=n // k),
            b=jnp.zeros((k, m // k, r_mini), jnp.float32),
        )


class MELoRAParams(LowRankAdapter):
    """The k mini-LoRAs of one projection.

    Attributes:
        a: stacked A_i, shape (k, r_m, n/k).
        b: stacked B_i, shape (k, m/k, r_m).
    """

    a: Float[Array, "k r_m n_k"]
    b: Float[Array, "k m_k r_m"]

    def factors(self):
        """Block-diagonal B (m, r) and A (r, n), so that s·B A = ΔW."""
        return jax.scipy.linalg.block_diag(*self.b), jax.scipy.linalg.block_diag(*self.a)

    def __call__(self, x, y, *, w0, bias, rng):
        """y + s · concat_i(B_i A_i x_i), without the zero blocks."""
        k = self.config.mini
        x_drop = input_dropout(x, self.config.dropout, rng)
        chunks = x_drop.reshape(*x.shape[:-1], k, x.shape[-1] // k)
        h = jnp.einsum("...kn,krn->...kr", chunks, self.a.astype(x.dtype))
        scaled_b = (self.config.scale * self.b).astype(h.dtype)
        out = jnp.einsum("...kr,kmr->...km", h, scaled_b).reshape(y.shape)
        return y + out.astype(y.dtype)
