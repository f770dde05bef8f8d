"""Analysis of trained adapters (GENLORA.md §6): the spectrum of ΔW, and RBF
reconstruction of LoRA bases; figures in `genlora_jax.analysis.plots`.

Everything reads a params tree (a wrapped tree, or `join`-ed halves). To
analyse a checkpoint, restore its params first, then call these functions.
"""

from genlora_jax.analysis.plots import plot_reconstruction, plot_spectra
from genlora_jax.analysis.reconstruction import (
    Reconstruction,
    basis_vectors,
    fit_rbf_reconstruction,
)
from genlora_jax.analysis.spectra import (
    PAPER_THRESHOLD,
    SpectrumRow,
    delta_weights,
    effective_rank,
    energy,
    spectral_table,
    spectrum,
)

__all__ = [
    "PAPER_THRESHOLD",
    "Reconstruction",
    "SpectrumRow",
    "basis_vectors",
    "delta_weights",
    "effective_rank",
    "energy",
    "fit_rbf_reconstruction",
    "plot_reconstruction",
    "plot_spectra",
    "spectral_table",
    "spectrum",
]
