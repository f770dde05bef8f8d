"""Analysis of trained adapters: the spectrum of ΔW, and RBF reconstruction of LoRA bases.

Two measurements from the GenLoRA paper (GENLORA.md §6):

- Effective rank and energy. For every adapted projection, the singular
  values σ of ΔW, the number of them above a threshold (paper: 0.005) and the
  energy Σσ² = ‖ΔW‖_F². The paper finds GenLoRA at rank r with far more
  energy than LoRA at the same r (q_proj, every layer).
- The motivation experiment. Average the r basis vectors of a trained LoRA
  factor into one prototype and fit r RBF generators (`generate_basis`) that
  map the prototype back to each basis vector; the paper recovers the shape
  with about 6 % of one basis vector's parameters (G·(K + 1) / d at d = 4096).

Everything reads a params tree (a wrapped tree, or `join`-ed halves). To
analyse a checkpoint, restore its params first, then call these functions.

Paper: Ouyang, Li, et al., "Nonlinearity as Rank: Generative Low-Rank Adapters
with Radial Basis Functions", arXiv 2602.05709 (2026).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from flax.core import unfreeze
from jaxtyping import Array, Float, Int, PRNGKeyArray

from genlora_jax._adapter import Adapter, LowRankAdapter
from genlora_jax._merge import _per_layer, _w0
from genlora_jax._rbf import generate_basis
from genlora_jax._wrap import ADAPTER_KEY, matches, path_str

PAPER_THRESHOLD = 0.005
"""The paper's cut-off for counting a singular value of ΔW as significant."""


def delta_weights(params: Mapping) -> dict[str, Float[Array, "*layers m n"]]:
    """Module path → ΔW (m, n) in float32, for every adapted projection.

    W0 comes from the kernel beside each adapter, in (m, n) orientation, so
    the tree must hold the base: a wrapped tree, or ``join(base, adapters)``
    after restoring an adapter-only checkpoint. Stacked layers (kernels
    (L, n, m) under ``nn.scan``) give ΔW of shape (L, m, n).

    Raises:
        ValueError: an adapter cannot be merged (no input-independent ΔW), or
            the tree has no kernel beside it.
    """
    flat = traverse_util.flatten_dict(unfreeze(params))
    out = {}
    for key, adapter in flat.items():
        if key[-1] != ADAPTER_KEY or not isinstance(adapter, Adapter):
            continue
        name = path_str(key[:-1])
        if not adapter.mergeable:
            raise ValueError(
                f"{name}: {type(adapter).__name__} has no input-independent ΔW "
                "(its nonlinearity acts on activations), so it has no spectrum."
            )
        kernel = flat.get((*key[:-1], "kernel"))
        if kernel is None:
            raise ValueError(
                f"{name}: the tree has no kernel beside the adapter, and ΔW may depend on W0; "
                "pass the full tree, `genlora_jax.join(base_params, adapters)`."
            )
        out[name] = _delta(adapter, kernel)
    return out


@jax.jit
def _delta(adapter: Adapter, kernel: Array) -> Array:
    delta = _per_layer(lambda a, w: a.delta_weight(w), kernel)
    return delta(adapter, _w0(kernel, adapter)).astype(jnp.float32)


def spectrum(params: Mapping) -> dict[str, Float[Array, " k"]]:
    """Module path → singular values of ΔW, descending, k = min(m, n).

    Computed by `jnp.linalg.svd` in float32; works for every mergeable method.
    Stacked layers give shape (L, k).

    Example:
        >>> import jax.numpy as jnp, genlora_jax as gl
        >>> base = {"q": {"kernel": jnp.ones((32, 16))}}
        >>> p = gl.wrap(base, ["q"], gl.LoRAConfig(rank=4))
        >>> gl.spectrum(p)["q"].shape  # B = 0 at init: all zeros
        (16,)
    """
    return {
        name: jnp.linalg.svd(dw, compute_uv=False) for name, dw in delta_weights(params).items()
    }


def effective_rank(
    sv: Float[Array, "*batch k"], threshold: float = PAPER_THRESHOLD
) -> Int[Array, "*batch"]:
    """The number of singular values strictly above ``threshold``."""
    return jnp.sum(sv > threshold, axis=-1)


def energy(sv: Float[Array, "*batch k"]) -> Float[Array, "*batch"]:
    """Σσ², which equals ‖ΔW‖_F²."""
    return jnp.sum(jnp.square(sv.astype(jnp.float32)), axis=-1)


class SpectrumRow(NamedTuple):
    """One adapted projection in `spectral_table`.

    Attributes:
        module: the module's own name, the last path component ("q_proj").
        layer: the first all-digit path component (the block index), or None.
        rank: singular values of ΔW above the threshold.
        energy: Σσ² of ΔW.
        path: the full module path.
    """

    module: str
    layer: int | None
    rank: int
    energy: float
    path: str


def _layer_index(path: str) -> int | None:
    """The block index in a module path ('model/layers/3/self_attn/q_proj' → 3)."""
    return next((int(part) for part in path.split("/") if part.isdigit()), None)


def spectral_table(params: Mapping, threshold: float = PAPER_THRESHOLD) -> list[SpectrumRow]:
    """Effective rank and energy of ΔW per projection, sorted by module, then layer.

    The layer is parsed from the path; for stacked layers (``nn.scan``) it is
    the position along the layer axis (flattened if there are several).

    Example:
        >>> import jax.numpy as jnp, genlora_jax as gl
        >>> base = {"layers": {"0": {"q": {"kernel": jnp.ones((32, 16))}}}}
        >>> gl.spectral_table(gl.wrap(base, ["q"], gl.GenLoRAConfig(rank=4, groups=4)))
        [SpectrumRow(module='q', layer=0, rank=0, energy=0.0, path='layers/0/q')]
    """
    rows = []
    for name, sv in spectrum(params).items():
        per_layer = sv.reshape(-1, sv.shape[-1])
        layers = [_layer_index(name)] if sv.ndim == 1 else range(per_layer.shape[0])
        rows += [
            SpectrumRow(
                module=name.rsplit("/", 1)[-1],
                layer=layer,
                rank=int(effective_rank(values, threshold)),
                energy=float(energy(values)),
                path=name,
            )
            for layer, values in zip(layers, per_layer, strict=True)
        ]
    return sorted(rows, key=lambda row: (row.module, -1 if row.layer is None else row.layer))


def plot_spectra(
    params_by_method: Mapping[str, Mapping],
    path: str | os.PathLike | None = None,
    *,
    module: str = "q_proj",
    threshold: float = PAPER_THRESHOLD,
) -> Any:
    """The paper's figure: effective rank and energy of ΔW by layer, methods side by side.

    Args:
        params_by_method: method label → params tree, e.g.
            ``{"LoRA r=8": lora, "GenLoRA r=8": genlora}``.
        path: where to save the PNG; None to only return the figure.
        module: which projections to show, a name or path regex as in `wrap`
            targets ("q_proj"; "query" for BERT).
        threshold: the singular-value cut-off of the rank panel.

    Returns:
        The `matplotlib.figure.Figure` (Agg canvas; pyplot is not touched).

    Raises:
        ValueError: ``module`` matches no adapted projection of some method.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_rank, ax_energy = fig.subplots(1, 2)
    width = 0.8 / max(len(params_by_method), 1)
    for i, (label, params) in enumerate(params_by_method.items()):
        table = spectral_table(params, threshold)
        rows = [row for row in table if matches(module, tuple(row.path.split("/")))]
        if not rows:
            names = sorted({row.module for row in table})
            raise ValueError(
                f"module={module!r} matches no adapted projection of {label!r}; "
                f"its adapted modules are named {names}."
            )
        x = [(row.layer or 0) + (i - (len(params_by_method) - 1) / 2) * width for row in rows]
        ax_rank.bar(x, [row.rank for row in rows], width, label=label)
        ax_energy.bar(x, [row.energy for row in rows], width, label=label)
    ax_rank.set(xlabel="layer", ylabel=f"# singular values > {threshold:g}")
    ax_rank.set_title(f"effective rank of ΔW ({module})")
    ax_energy.set(xlabel="layer", ylabel="energy Σσ²", yscale="log")
    ax_energy.set_title(f"energy of ΔW ({module})")
    fig.legend(*ax_rank.get_legend_handles_labels(), loc="outside lower center", ncols=4)
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


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


def plot_reconstruction(
    result: Reconstruction, index: int = 0, path: str | os.PathLike | None = None
) -> Any:
    """Target vs reconstruction of basis vector ``index``: by coordinate, and as a scatter.

    Returns:
        The `matplotlib.figure.Figure` (saved as PNG to ``path`` unless None).
    """
    from matplotlib.figure import Figure

    rank = result.basis.shape[0]
    if not 0 <= index < rank:
        raise IndexError(f"index={index} is out of range for r={rank} basis vectors.")
    target, recon = result.basis[index], result.reconstruction[index]
    fig = Figure(figsize=(10, 3.4), layout="constrained")
    ax_line, ax_scatter = fig.subplots(1, 2, width_ratios=(2.2, 1))
    ax_line.plot(target, lw=1.0, label="target")
    ax_line.plot(recon, lw=1.0, label="RBF reconstruction")
    ax_line.set(xlabel="coordinate", ylabel="value")
    groups = result.theta.shape[1]
    title = (
        f"basis vector {index}: rel. error {float(result.rel_error[index]):.3f}, "
        f"cosine {float(result.cosine[index]):.3f}, G={groups}, "
        f"generator params {result.param_share:.1%} of a vector"
    )
    ax_line.set_title(title, fontsize="medium")
    ax_line.legend(loc="upper right")
    ax_scatter.scatter(target, recon, s=4)
    lim = float(jnp.max(jnp.abs(jnp.concatenate([target, recon]))))
    ax_scatter.plot([-lim, lim], [-lim, lim], color="grey", lw=0.8)
    ax_scatter.set(xlabel="target", ylabel="reconstruction", aspect="equal")
    ax_scatter.locator_params(nbins=4)
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig
