"""genlora_jax: GenLoRA (LoRA with RBF-generated factors) and its baselines in JAX/Flax.

Paper: Ouyang, Li, et al., "Nonlinearity as Rank: Generative Low-Rank Adapters
with Radial Basis Functions", arXiv 2602.05709 (2026).
"""

from genlora_jax._adapter import Adapter as Adapter
from genlora_jax._adapter import AdapterConfig as AdapterConfig
from genlora_jax._adapter import LowRankAdapter as LowRankAdapter
from genlora_jax._adapter import low_rank_delta as low_rank_delta
from genlora_jax._analysis import Reconstruction as Reconstruction
from genlora_jax._analysis import SpectrumRow as SpectrumRow
from genlora_jax._analysis import basis_vectors as basis_vectors
from genlora_jax._analysis import delta_weights as delta_weights
from genlora_jax._analysis import effective_rank as effective_rank
from genlora_jax._analysis import energy as energy
from genlora_jax._analysis import fit_rbf_reconstruction as fit_rbf_reconstruction
from genlora_jax._analysis import plot_reconstruction as plot_reconstruction
from genlora_jax._analysis import plot_spectra as plot_spectra
from genlora_jax._analysis import spectral_table as spectral_table
from genlora_jax._analysis import spectrum as spectrum
from genlora_jax._aurora import AuroRAConfig as AuroRAConfig
from genlora_jax._aurora import AuroRAParams as AuroRAParams
from genlora_jax._checkpoint import AdapterCheckpointer as AdapterCheckpointer
from genlora_jax._checkpoint import Checkpoint as Checkpoint
from genlora_jax._checkpoint import CorruptCheckpointError as CorruptCheckpointError
from genlora_jax._compare import compare_methods as compare_methods
from genlora_jax._count import ParamCount as ParamCount
from genlora_jax._count import count_params as count_params
from genlora_jax._count import summary as summary
from genlora_jax._dora import DoRAConfig as DoRAConfig
from genlora_jax._dora import DoRAParams as DoRAParams
from genlora_jax._genlora import GenLoRAConfig as GenLoRAConfig
from genlora_jax._genlora import GenLoRAParams as GenLoRAParams
from genlora_jax._guard import AdapterNotAppliedError as AdapterNotAppliedError
from genlora_jax._hira import HiRAConfig as HiRAConfig
from genlora_jax._hira import HiRAParams as HiRAParams
from genlora_jax._intercept import adapted as adapted
from genlora_jax._intercept import apply as apply
from genlora_jax._lora import LoRAConfig as LoRAConfig
from genlora_jax._lora import LoRAParams as LoRAParams
from genlora_jax._loran import LoRANConfig as LoRANConfig
from genlora_jax._loran import LoRANParams as LoRANParams
from genlora_jax._masking import optimizer as optimizer
from genlora_jax._masking import trainable_mask as trainable_mask
from genlora_jax._melora import MELoRAConfig as MELoRAConfig
from genlora_jax._melora import MELoRAParams as MELoRAParams
from genlora_jax._merge import merge as merge
from genlora_jax._merge import unmerge as unmerge
from genlora_jax._peft import export_peft as export_peft
from genlora_jax._peft import import_peft as import_peft
from genlora_jax._peft import save_merged as save_merged
from genlora_jax._precision import cast_base as cast_base
from genlora_jax._rbf import ACTIVATIONS as ACTIVATIONS
from genlora_jax._rbf import generate_basis as generate_basis
from genlora_jax._rbf import instance_norm as instance_norm
from genlora_jax._rbf import rbf_features as rbf_features
from genlora_jax._sharding import partition_specs as partition_specs
from genlora_jax._sharding import shard as shard
from genlora_jax._sharding import shardings as shardings
from genlora_jax._sharding import state_shardings as state_shardings
from genlora_jax._wrap import ADAPTER_KEY as ADAPTER_KEY
from genlora_jax._wrap import GPT2_CONV1D as GPT2_CONV1D
from genlora_jax._wrap import find_targets as find_targets
from genlora_jax._wrap import join as join
from genlora_jax._wrap import model_params as model_params
from genlora_jax._wrap import named_adapters as named_adapters
from genlora_jax._wrap import split as split
from genlora_jax._wrap import wrap as wrap

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "ADAPTER_KEY",
    "GPT2_CONV1D",
    "Adapter",
    "AdapterCheckpointer",
    "AdapterConfig",
    "AdapterNotAppliedError",
    "AuroRAConfig",
    "AuroRAParams",
    "Checkpoint",
    "CorruptCheckpointError",
    "DoRAConfig",
    "DoRAParams",
    "GenLoRAConfig",
    "GenLoRAParams",
    "HiRAConfig",
    "HiRAParams",
    "LoRAConfig",
    "LoRANConfig",
    "LoRANParams",
    "LoRAParams",
    "LowRankAdapter",
    "MELoRAConfig",
    "MELoRAParams",
    "ParamCount",
    "Reconstruction",
    "SpectrumRow",
    "adapted",
    "apply",
    "basis_vectors",
    "cast_base",
    "compare_methods",
    "count_params",
    "delta_weights",
    "effective_rank",
    "energy",
    "export_peft",
    "find_targets",
    "fit_rbf_reconstruction",
    "generate_basis",
    "import_peft",
    "instance_norm",
    "join",
    "low_rank_delta",
    "merge",
    "model_params",
    "named_adapters",
    "optimizer",
    "partition_specs",
    "plot_reconstruction",
    "plot_spectra",
    "rbf_features",
    "save_merged",
    "shard",
    "shardings",
    "spectral_table",
    "spectrum",
    "split",
    "state_shardings",
    "summary",
    "trainable_mask",
    "unmerge",
    "wrap",
]
