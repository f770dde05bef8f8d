"""The paper's motivation experiment: RBF reconstruction of LoRA basis vectors.

Average the r basis vectors of a trained LoRA factor into one prototype and
fit r RBF generators (`genlora_jax.methods.rbf.generate_basis`) that map the
prototype back to each basis vector; the paper recovers the shape with about
6 % of one basis vector's parameters (G·(K + 1) / d at d = 4096).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, PRNGKeyArray

from genlora_jax.methods.base import LowRankAdapter
from genlora_jax.methods.rbf import generate_basis


def basis_vectors(adapter: LowRankAdapter, factor: str = "a") -> Float[Array, "r d"]:
    """The r basis vectors of a low-rank adapter: A's rows (d = n) or B's columns (d = m).

    Args:
        adapter: any `LowRankAdapter` (a trained LoRA, or GenLoRA's generated factors).
        factor: "a" for the rows of A, "b" for the columns of B.
    """
    if factor not in ("a", "b"):
        raise ValueError(f"factor must be 'a' (rows of A) or 'b' (columns of B), got {factor!r}.")
    b, a = adapter.factors()
    return (a if factor == "a" else b.T).astype(jnp.float32)


class Reconstruction(NamedTuple):
    """Result of `fit_rbf_reconstruction`.

    Attributes:
        basis: the targets, shape (r, d).
        prototype: their mean, the generators' shared latent, shape (d,).
        theta: fitted generator weights, shape (r, G, K + 1).
        reconstruction: ``generate_basis(prototype, theta)``, shape (r, d).
        rel_error: ‖target − reconstruction‖ / ‖target‖ per vector, shape (r,).
        cosine: cosine similarity of target and reconstruction, shape (r,).
        param_share: G·(K + 1) / d, one generator's numbers over one vector's.
        loss: the MSE before each Adam step, shape (epochs,).
    """

    basis: Float[Array, "r d"]
    prototype: Float[Array, " d"]
    theta: Float[Array, "r G K+1"]
    reconstruction: Float[Array, "r d"]
    rel_error: Float[Array, " r"]
    cosine: Float[Array, " r"]
    param_share: float
    loss: Float[Array, " epochs"]


@functools.partial(jax.jit, static_argnames=("epochs", "lr"))
def _fit(basis, theta, *, epochs, lr):
    prototype = jnp.mean(basis, axis=0)
    tx = optax.adam(lr)

    def loss_fn(theta):
        return jnp.mean(jnp.square(generate_basis(prototype, theta) - basis))

    def step(carry, _):
        theta, state = carry
        loss, grad = jax.value_and_grad(loss_fn)(theta)
        # optax's bias correction computes float ** int32 count, which strict
        # dtype promotion rejects; the user's setting still governs our own math.
        with jax.numpy_dtype_promotion("standard"):
            updates, state = tx.update(grad, state, theta)
        return (optax.apply_updates(theta, updates), state), loss

    (theta, _), losses = jax.lax.scan(step, (theta, tx.init(theta)), length=epochs)
    return prototype, theta, generate_basis(prototype, theta), losses


def fit_rbf_reconstruction(
    basis: Float[Array, "r d"],
    *,
    groups: int = 16,
    centres: int = 15,
    epochs: int = 2000,
    lr: float = 1e-3,
    rng: PRNGKeyArray,
) -> Reconstruction:
    """Fits r RBF generators that map the mean of ``basis`` back to each basis vector.

    The paper's motivation experiment (GENLORA.md §6): the prototype is the
    mean of the r vectors; generator i is `generate_basis` row i with its own
    θ[i] of shape (G, K + 1) on the paper's grid (K centres on [-3, 3], SiLU
    base branch, instance normalisation); Adam minimises the MSE over all r·d
    numbers, one full-batch step per epoch. The prototype is fixed, so the
    problem is linear least squares in θ and the fit is deterministic given
    its initialisation.

    Args:
        basis: the vectors to reconstruct, e.g. `basis_vectors` of a trained
            LoRA (A's rows, d = n). d must be a multiple of ``groups``.
        groups: G.
        centres: K.
        epochs: Adam steps.
        lr: Adam learning rate.
        rng: initialises θ ~ N(0, 0.01² · mean(basis²)). The paper does not
            say how θ starts; a start this small keeps the first
            reconstruction far below the targets' scale, so Adam's fixed step
            size (≈ lr per weight) does not first have to undo a large output.

    Returns:
        A `Reconstruction`.

    Example:
        >>> import jax, genlora_jax as gl
        >>> basis = jax.random.normal(jax.random.key(1), (4, 256))
        >>> res = gl.fit_rbf_reconstruction(basis, groups=4, epochs=10, rng=jax.random.key(0))
        >>> res.theta.shape, round(res.param_share, 2)
        ((4, 4, 16), 0.25)
    """
    rank, d = basis.shape
    if d % groups:
        raise ValueError(
            f"groups={groups} does not divide the basis vectors' length d={d}; "
            f"choose a divisor of {d}."
        )
    basis = basis.astype(jnp.float32)
    scale = 0.01 * jnp.sqrt(jnp.mean(jnp.square(basis)))
    theta0 = scale * jax.random.normal(rng, (rank, groups, centres + 1), jnp.float32)
    prototype, theta, recon, losses = _fit(basis, theta0, epochs=epochs, lr=lr)
    residual = jnp.linalg.norm(basis - recon, axis=-1)
    norms = jnp.linalg.norm(basis, axis=-1)
    cosine = jnp.sum(basis * recon, axis=-1) / (norms * jnp.linalg.norm(recon, axis=-1))
    return Reconstruction(
        basis=basis,
        prototype=prototype,
        theta=theta,
        reconstruction=recon,
        rel_error=residual / norms,
        cosine=cosine,
        param_share=groups * (centres + 1) / d,
        loss=losses,
    )
