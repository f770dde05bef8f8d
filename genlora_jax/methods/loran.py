"""LoRAN (Deng et al. 2025): an entrywise nonlinearity on the low-rank product.

"Enhancing Low-Rank Adaptation with Structured Nonlinear Transformations",
arXiv 2509.21870. The update applies the Sinter activation to every entry of
the m × n product B A:

    ΔW = s · σ(B A),        σ(z) = z + a · z · sin(ω z),

with a and ω fixed hyper-parameters (defaults a = 5e-4, ω = 1000, as in
BASELINES.md). σ(0) = 0, so LoRA's init (A Kaiming-uniform, B = 0) gives
ΔW = 0 at step 0. ΔW does not depend on the input, so it merges: W0 + ΔW.
Trainable per (m × n) projection: r·(m + n), as LoRA. The forward forms the
m × n product once per call, which LoRA never does.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
from jaxtyping import Array, Float

from genlora_jax.methods.base import Adapter, AdapterConfig, check_real, input_dropout, lora_factors


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRANConfig(AdapterConfig):
    """LoRAN with the Sinter activation.

    Attributes:
        amplitude: a in σ(z) = z + a·z·sin(ωz) (fixed, not trained).
        frequency: ω in σ(z) = z + a·z·sin(ωz) (fixed, not trained).
    """

    method: ClassVar[str] = "loran"

    amplitude: float = 5e-4
    frequency: float = 1000.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_real(self, "amplitude")
        check_real(self, "frequency")

    def init(self, rng, *, m, n, kernel_transposed, path):
        a, b = lora_factors(rng, rank=self.rank, m=m, n=n)
        return LoRANParams(config=self, kernel_transposed=kernel_transposed, a=a, b=b)


def sinter(z: Array, amplitude: float, frequency: float) -> Array:
    """σ(z) = z + a · z · sin(ω z), entrywise."""
    return z + amplitude * z * jnp.sin(frequency * z)


class LoRANParams(Adapter):
    """LoRAN factors of one projection. Attributes: a (r, n), b (m, r)."""

    a: Float[Array, "r n"]
    b: Float[Array, "m r"]

    def delta_weight(self, w0: Float[Array, "m n"]) -> Float[Array, "m n"]:
        """ΔW = s · σ(B A); independent of W0."""
        cfg = self.config
        return cfg.scale * sinter(self.b @ self.a, cfg.amplitude, cfg.frequency)

    def unmerged_weight(self, w: Float[Array, "m n"]) -> Float[Array, "m n"]:
        return w - self.delta_weight(w)

    def __call__(self, x, y, *, w0, bias, rng):
        x_drop = input_dropout(x, self.config.dropout, rng)
        return y + (x_drop @ self.delta_weight(w0).T.astype(x.dtype)).astype(y.dtype)
