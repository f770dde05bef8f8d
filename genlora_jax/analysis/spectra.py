"""The spectrum of ΔW: effective rank and energy per adapted projection.

A measurement from the GenLoRA paper (GENLORA.md §6): for every adapted
projection, the singular values σ of ΔW, the number of them above a threshold
(paper: 0.005) and the energy Σσ² = ‖ΔW‖_F². The paper finds GenLoRA at rank r
with far more energy than LoRA at the same r (q_proj, every layer).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from genlora_jax._tree import Site, sites
from genlora_jax.methods.base import Adapter

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
    out = {}
    for site in sites(params):
        if not site.adapter.mergeable:
            raise ValueError(
                f"{site.name}: {type(site.adapter).__name__} has no input-independent ΔW "
                "(its nonlinearity acts on activations), so it has no spectrum."
            )
        out[site.name] = _delta(site.adapter, site.kernel)
    return out


@jax.jit
def _delta(adapter: Adapter, kernel: Array) -> Array:
    site = Site((), kernel, adapter)
    return site.per_layer(lambda a, w: a.delta_weight(w)).astype(jnp.float32)


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
