"""LoRA (Hu et al. 2022): ΔW = s · B A with stored factors, the baseline."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
from jaxtyping import Array, Float

from genlora_jax._adapter import AdapterConfig, LowRankAdapter, kaiming_uniform


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAConfig(AdapterConfig):
    """Plain LoRA: A Kaiming-uniform (PEFT's init), B = 0, r·(m + n) parameters."""

    method: ClassVar[str] = "lora"

    def init(self, rng, *, m, n, kernel_transposed, path):
        return LoRAParams(
            config=self,
            kernel_transposed=kernel_transposed,
            a=kaiming_uniform(rng, (self.rank, n), fan_in=n),
            b=jnp.zeros((m, self.rank), jnp.float32),
        )


class LoRAParams(LowRankAdapter):
    """Stored factors. Attributes: a (r, n), b (m, r)."""

    a: Float[Array, "r n"]
    b: Float[Array, "m r"]

    def factors(self):
        return self.b, self.a
