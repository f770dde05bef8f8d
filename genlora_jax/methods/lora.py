"""LoRA (Hu et al. 2022): ΔW = s · B A with stored factors, the baseline."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
from jaxtyping import Array, Float

from genlora_jax.methods.base import AdapterConfig, LowRankAdapter, lora_factors


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAConfig(AdapterConfig):
    """Plain LoRA: A Kaiming-uniform (PEFT's init), B = 0, r·(m + n) parameters."""

    method: ClassVar[str] = "lora"

    def init(self, rng, *, m, n, kernel_transposed, path):
        a, b = lora_factors(rng, rank=self.rank, m=m, n=n)
        return LoRAParams(config=self, kernel_transposed=kernel_transposed, a=a, b=b)

    def from_lora(self, tensors, *, w0, kernel_transposed):
        a, b = (jnp.asarray(tensors[k], jnp.float32) for k in ("lora_A", "lora_B"))
        return LoRAParams(config=self, kernel_transposed=kernel_transposed, a=a, b=b)


class LoRAParams(LowRankAdapter):
    """Stored factors. Attributes: a (r, n), b (m, r)."""

    a: Float[Array, "r n"]
    b: Float[Array, "m r"]

    def factors(self):
        return self.b, self.a
