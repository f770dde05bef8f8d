"""AuroRA (Dong et al. 2025): a small nonlinear layer between A and B.

"AuroRA: Breaking Low-Rank Bottleneck of LoRA with Nonlinear Mapping",
arXiv 2505.18738. With h = A x (r-dimensional), the Adaptive Nonlinear Layer is

    ANL(h) = tanh(W_m tanh(h)) + spline(h),    y = W0 x + b + s · B ANL(h),

where W_m (r × r) mixes the fixed tanh branch and spline_j(h_j) =
Σ_c W_s[j, c] · N_c(h_j) is a learnable cubic B-spline per rank channel j
(KAN-style, applied entrywise; W_s is (r, C)). The B-spline basis N_c has
``grid_size`` = 5 uniform intervals on [-1, 1] and order 3, extended by 3
knots on each side as in KAN, so C = grid_size + order = 8 basis functions,
supported on [-2.2, 2.2] and zero outside. (One public re-implementation
instead sums the bases over the r channels before W_s; we keep the entrywise
form that "W_s · Bspline(h)" describes.)

Init: A as LoRA (Kaiming-uniform), B = 0, W_m Xavier-normal (untruncated,
std 1/√r), W_s uniform on ±0.1; B = 0 makes the adapted layer the base layer
at step 0. Trainable per (m × n) projection: r·(m + n) + r² + r·C.

The nonlinearity acts on activations, so there is no weight update ΔW and
the adapter cannot be merged (``mergeable = False``): serve it through
`genlora_jax.apply`. AuroRA's paper merges *approximately*, folding
B · ANL(A) into W0 as if the nonlinearity acted on A's weights rather than on
A x; that changes the model's outputs, so `merge` refuses rather than return
a different model under the same name (exact inference is the interceptor).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from genlora_jax.methods.base import Adapter, AdapterConfig, check_int, input_dropout, lora_factors

SPLINE_INIT = 0.1
"""W_s is initialised uniformly on ±SPLINE_INIT."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class AuroRAConfig(AdapterConfig):
    """AuroRA hyper-parameters.

    Attributes:
        grid_size: uniform intervals of the spline grid.
        spline_order: polynomial order of the B-spline (3: cubic).
        grid: (lo, hi) of the spline grid, before the extension by
            ``spline_order`` knots on each side.
    """

    method: ClassVar[str] = "aurora"

    grid_size: int = 5
    spline_order: int = 3
    grid: tuple[float, float] = (-1.0, 1.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "grid_size", minimum=1)
        check_int(self, "spline_order", minimum=0)
        object.__setattr__(self, "grid", tuple(float(v) for v in self.grid))
        lo, hi = self.grid
        if self.grid_size < 1 or self.spline_order < 0 or not lo < hi:
            raise ValueError(
                f"need grid_size ≥ 1, spline_order ≥ 0 and grid lo < hi, got "
                f"grid_size={self.grid_size}, spline_order={self.spline_order}, grid={self.grid}."
            )

    @property
    def knots(self) -> np.ndarray:
        """The grid_size + 2·order + 1 uniform knots, extended past [lo, hi]."""
        lo, hi = self.grid
        step = (hi - lo) / self.grid_size
        return lo + step * np.arange(-self.spline_order, self.grid_size + self.spline_order + 1)

    def init(self, rng, *, m, n, kernel_transposed, path):
        key_lora, key_mixer, key_spline = jax.random.split(rng, 3)
        a, b = lora_factors(key_lora, rank=self.rank, m=m, n=n)
        r, c = self.rank, self.grid_size + self.spline_order
        return AuroRAParams(
            config=self,
            kernel_transposed=kernel_transposed,
            a=a,
            b=b,
            mixer=jax.random.normal(key_mixer, (r, r), jnp.float32) / math.sqrt(r),
            spline=jax.random.uniform(key_spline, (r, c), jnp.float32, -SPLINE_INIT, SPLINE_INIT),
        )


def bspline_basis(
    x: Float[Array, "*batch"], knots: np.ndarray, order: int
) -> Float[Array, "*batch C"]:
    """B-spline basis N_c(x) by the Cox–de Boor recursion.

    Args:
        x: points, any shape.
        knots: increasing knots, shape (C + order + 1,).
        order: polynomial order (3: cubic).

    Returns:
        The C = len(knots) − order − 1 basis values at each point; all zero
        outside [knots[0], knots[-1]).
    """
    t = jnp.asarray(knots, x.dtype).reshape((1,) * x.ndim + (-1,))
    x = x[..., None]
    bases = ((x >= t[..., :-1]) & (x < t[..., 1:])).astype(x.dtype)
    for k in range(1, order + 1):
        left = (x - t[..., : -(k + 1)]) / (t[..., k:-1] - t[..., : -(k + 1)])
        right = (t[..., k + 1 :] - x) / (t[..., k + 1 :] - t[..., 1:-k])
        bases = left * bases[..., :-1] + right * bases[..., 1:]
    return bases


class AuroRAParams(Adapter):
    """AuroRA state of one projection.

    Attributes:
        a: A, shape (r, n).
        b: B, shape (m, r).
        mixer: W_m of the tanh branch, shape (r, r).
        spline: W_s, spline coefficients per rank channel, shape (r, C).
    """

    a: Float[Array, "r n"]
    b: Float[Array, "m r"]
    mixer: Float[Array, "r r"]
    spline: Float[Array, "r C"]

    mergeable: ClassVar[bool] = False

    def nonlinearity(self, h: Float[Array, "*batch r"]) -> Float[Array, "*batch r"]:
        """ANL(h) = tanh(W_m tanh(h)) + spline(h), in float32."""
        cfg = self.config
        h = h.astype(jnp.float32)
        fixed = jnp.tanh(jnp.tanh(h) @ self.mixer.T)
        bases = bspline_basis(h, cfg.knots, cfg.spline_order)
        return fixed + jnp.einsum("...rc,rc->...r", bases, self.spline)

    def delta_weight(self, w0: Float[Array, "m n"]) -> Float[Array, "m n"]:
        raise ValueError(
            "AuroRA has no weight update ΔW: its nonlinearity acts on the activations A x. "
            "Use the adapted forward (`genlora_jax.apply`) instead of delta_weight/merge."
        )

    def __call__(self, x, y, *, w0, bias, rng):
        h = input_dropout(x, self.config.dropout, rng) @ self.a.T.astype(x.dtype)
        g = self.nonlinearity(h).astype(x.dtype)
        return y + (g @ (self.config.scale * self.b).T.astype(g.dtype)).astype(y.dtype)
