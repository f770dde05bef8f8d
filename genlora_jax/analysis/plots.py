"""Figures of the analysis (matplotlib, an optional dependency: ``pip install
'genlora_jax[plot]'``). Figures are built on the Agg canvas; pyplot is not touched."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from genlora_jax._select import matches
from genlora_jax.analysis.reconstruction import Reconstruction
from genlora_jax.analysis.spectra import PAPER_THRESHOLD, spectral_table


def _figure(**kwargs: Any) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "plotting needs matplotlib, an optional dependency: pip install 'genlora_jax[plot]' "
            "(or pip install matplotlib)."
        ) from None
    return Figure(**kwargs)


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
    fig = _figure(figsize=(10, 4), layout="constrained")
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


def plot_reconstruction(
    result: Reconstruction, index: int = 0, path: str | os.PathLike | None = None
) -> Any:
    """Target vs reconstruction of basis vector ``index``: by coordinate, and as a scatter.

    Returns:
        The `matplotlib.figure.Figure` (saved as PNG to ``path`` unless None).
    """
    rank = result.basis.shape[0]
    if not 0 <= index < rank:
        raise IndexError(f"index={index} is out of range for r={rank} basis vectors.")
    target, recon = result.basis[index], result.reconstruction[index]
    fig = _figure(figsize=(10, 3.4), layout="constrained")
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
