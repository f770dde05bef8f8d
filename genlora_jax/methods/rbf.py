"""The radial-basis-function generator of GenLoRA (GENLORA.md §2).

One latent z ∈ R^d is split into G groups of D = d/G numbers, each group is
instance-normalised, and every normalised number x̂ becomes K + 1 features
[act(x̂), φ_1(x̂), …, φ_K(x̂)] with Gaussian bumps φ_k(x̂) = exp(−((x̂ − μ_k)/h)²)
on a fixed grid. Generator i owns θ[i] of shape (G, K + 1) and emits basis
vector i as one contraction of those features, so r basis vectors cost one
einsum: features (G, D, K + 1) · θ (r, G, K + 1) → (r, G, D) → (r, d).

Paper: Ouyang, Li, et al., "Nonlinearity as Rank: Generative Low-Rank Adapters
with Radial Basis Functions", arXiv 2602.05709 (2026).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "silu": jax.nn.silu,
    "gelu": jax.nn.gelu,
    "tanh": jnp.tanh,
    "identity": lambda x: x,
}


def rbf_centres(centres: int, grid: tuple[float, float]) -> tuple[Float[Array, " K"], float]:
    """K evenly spaced centres μ on [lo, hi] and the bandwidth h = (hi − lo)/(K − 1)."""
    lo, hi = grid
    if centres < 2 or not hi > lo:
        raise ValueError(f"need centres >= 2 and grid lo < hi, got {centres=} {grid=}.")
    return jnp.linspace(lo, hi, centres, dtype=jnp.float32), (hi - lo) / (centres - 1)


def instance_norm(x: Float[Array, "G D"], eps: float) -> Float[Array, "G D"]:
    """(x − mean) / (std + ε) per group, with a gradient that is finite at std = 0.

    The population std (ddof = 0) is used. ``jnp.std`` differentiates
    sqrt(var) as 1/(2·sqrt(var)), which is inf at var = 0 and turns the chain
    rule into inf · 0 = NaN when the latent is all zeros (z_B at init). The
    double ``where`` keeps the value exact and routes the derivative of the
    zero-variance branch through a constant.
    """
    centred = x - jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
    positive = var > 0
    std = jnp.where(positive, jnp.sqrt(jnp.where(positive, var, 1.0)), 0.0)
    return centred / (std + eps)


def rbf_features(
    z: Float[Array, " d"],
    *,
    groups: int,
    centres: int = 15,
    grid: tuple[float, float] = (-3.0, 3.0),
    normalize: bool = True,
    eps: float = 1e-5,
    activation: str = "silu",
) -> Float[Array, "G D K+1"]:
    """Features [act(x̂), φ_1(x̂) … φ_K(x̂)] of every number of the latent.

    Args:
        z: the latent, d = G·D numbers.
        groups: G; must divide d.
        centres: K Gaussian centres on ``grid``.
        grid: (lo, hi) of the centres.
        normalize: instance-normalise each group (the paper's default; the
            ablation turns it off).
        eps: ε of the normalisation.
        activation: the base branch, one of `ACTIVATIONS` (paper: SiLU).

    Returns:
        Array of shape (G, D, K + 1), feature 0 being the base activation.
    """
    (d,) = z.shape
    if d % groups:
        raise ValueError(f"groups={groups} does not divide the latent length {d}.")
    x = z.reshape(groups, d // groups).astype(jnp.float32)
    if normalize:
        x = instance_norm(x, eps)
    mu, h = rbf_centres(centres, grid)
    bumps = jnp.exp(-jnp.square((x[..., None] - mu[None, None, :]) / h))
    return jnp.concatenate([ACTIVATIONS[activation](x)[..., None], bumps], axis=-1)


def generate_basis(
    z: Float[Array, " d"],
    theta: Float[Array, "r G K+1"],
    *,
    grid: tuple[float, float] = (-3.0, 3.0),
    normalize: bool = True,
    eps: float = 1e-5,
    activation: str = "silu",
) -> Float[Array, "r d"]:
    """The r basis vectors generated from one latent: row i is f_i(z).

    G and K are read from ``theta``'s shape. θ[i, g, 0] is the base weight w_b
    of generator i in group g, θ[i, g, 1:] its K RBF weights.

    Args:
        z: the shared latent, shape (d,).
        theta: generator weights, shape (r, G, K + 1).
        grid, normalize, eps, activation: as in `rbf_features`.

    Returns:
        Array of shape (r, d).
    """
    rank, groups, k1 = theta.shape
    feats = rbf_features(
        z,
        groups=groups,
        centres=k1 - 1,
        grid=grid,
        normalize=normalize,
        eps=eps,
        activation=activation,
    )
    return jnp.einsum("gdk,rgk->rgd", feats, theta.astype(jnp.float32)).reshape(rank, -1)
