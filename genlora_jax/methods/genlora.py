"""GenLoRA: B and A generated from one latent each by r RBF generators.

Per adapted (m × n) projection the trainable numbers are z_B (m), z_A (n) and
θ_B, θ_A (r, G, K + 1) each: m + n + 2·r·G·(K + 1), against LoRA's r·(m + n).
The update is exactly ΔW = s · B A with rank ≤ r, so it merges into W0.
See GENLORA.md and `genlora_jax.methods.rbf` for the generator.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from genlora_jax.methods.base import (
    AdapterConfig,
    LowRankAdapter,
    check_int,
    check_real,
    kaiming_uniform,
)
from genlora_jax.methods.rbf import ACTIVATIONS, generate_basis, rbf_centres


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenLoRAConfig(AdapterConfig):
    """GenLoRA hyper-parameters (paper defaults: G = 16, K = 15 on [-3, 3]).

    Attributes:
        groups: G, the number of groups each latent is split into; must divide
            both m and n of every targeted projection.
        centres: K Gaussian centres.
        grid: (lo, hi) of the centre grid; the bandwidth is (hi − lo)/(K − 1).
        normalize: instance normalisation per group (ablation: False).
        eps: ε in (x − mean)/(std + ε).
        base_activation: the w_b branch, a key of `genlora_jax.ACTIVATIONS`.
        freeze_z_a: keep the latent z_A at its initial value (ablation).
        freeze_z_b: keep the latent z_B at its initial value (ablation). With
            normalisation on, a frozen all-zero z_B normalises to zeros in
            every group, so every feature is the same constant and basis
            vector i is constant *within each group* (its value in group g is
            θ_B[i, g] · [SiLU(0), φ_1(0), …, φ_K(0)]): B has at most G distinct
            rows-blocks and rank(B) ≤ min(r, G). This is the paper's collapse.

    Initialisation (ΔW = 0 at step 0): z_A Kaiming-uniform U(±1/√n), θ_A normal
    scaled by 1/√(n/G) independently per generator, z_B = 0, θ_B = 0.
    """

    method: ClassVar[str] = "genlora"

    groups: int = 16
    centres: int = 15
    grid: tuple[float, float] = (-3.0, 3.0)
    normalize: bool = True
    eps: float = 1e-5
    base_activation: str = "silu"
    freeze_z_a: bool = False
    freeze_z_b: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "groups", minimum=1)
        check_int(self, "centres", minimum=2)
        check_real(self, "eps", positive=True)
        object.__setattr__(self, "grid", tuple(float(v) for v in self.grid))
        rbf_centres(self.centres, self.grid)
        if self.base_activation not in ACTIVATIONS:
            raise ValueError(
                f"base_activation={self.base_activation!r} is unknown; "
                f"choose one of {sorted(ACTIVATIONS)}."
            )

    def init(self, rng, *, m, n, kernel_transposed, path):
        for name, d in (("out (m)", m), ("in (n)", n)):
            if d % self.groups:
                fits = [g for g in range(1, 65) if m % g == 0 and n % g == 0]
                raise ValueError(
                    f"{path}: groups={self.groups} does not divide its {name} size {d} "
                    f"(kernel m={m}, n={n}). Choose groups from {fits}, or give this "
                    "module its own groups via overrides={pattern: {'groups': g}}."
                )
        key_z, key_theta = jax.random.split(rng)
        shape = (self.rank, self.groups, self.centres + 1)
        return GenLoRAParams(
            config=self,
            kernel_transposed=kernel_transposed,
            z_a=kaiming_uniform(key_z, (n,), fan_in=n),
            theta_a=jax.random.normal(key_theta, shape, jnp.float32) / math.sqrt(n // self.groups),
            z_b=jnp.zeros((m,), jnp.float32),
            theta_b=jnp.zeros(shape, jnp.float32),
        )


class GenLoRAParams(LowRankAdapter):
    """Latents and generator weights of one projection.

    Attributes:
        z_a: latent of A, shape (n,).
        theta_a: generators of A's rows, shape (r, G, K + 1).
        z_b: latent of B, shape (m,).
        theta_b: generators of B's columns, shape (r, G, K + 1).
    """

    z_a: Float[Array, " n"]
    theta_a: Float[Array, "r G K+1"]
    z_b: Float[Array, " m"]
    theta_b: Float[Array, "r G K+1"]

    generated: ClassVar[bool] = True

    def frozen_fields(self):
        cfg = self.config
        return frozenset(
            name for name, frozen in (("z_a", cfg.freeze_z_a), ("z_b", cfg.freeze_z_b)) if frozen
        )

    def factors(self):
        cfg = self.config
        kw = dict(
            grid=cfg.grid, normalize=cfg.normalize, eps=cfg.eps, activation=cfg.base_activation
        )
        b = generate_basis(self.z_b, self.theta_b, **kw).T
        a = generate_basis(self.z_a, self.theta_a, **kw)
        return b, a
