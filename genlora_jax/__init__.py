"""genlora_jax: GenLoRA (LoRA with RBF-generated factors) and its baselines in JAX/Flax.

Paper: Ouyang, Li, et al., "Nonlinearity as Rank: Generative Low-Rank Adapters
with Radial Basis Functions", arXiv 2602.05709 (2026).
"""

from genlora_jax._adapter import Adapter as Adapter
from genlora_jax._adapter import AdapterConfig as AdapterConfig
from genlora_jax._adapter import LowRankAdapter as LowRankAdapter
from genlora_jax._adapter import low_rank_delta as low_rank_delta
from genlora_jax._count import ParamCount as ParamCount
from genlora_jax._count import count_params as count_params
from genlora_jax._count import summary as summary
from genlora_jax._genlora import GenLoRAConfig as GenLoRAConfig
from genlora_jax._genlora import GenLoRAParams as GenLoRAParams
from genlora_jax._intercept import adapted as adapted
from genlora_jax._intercept import apply as apply
from genlora_jax._lora import LoRAConfig as LoRAConfig
from genlora_jax._lora import LoRAParams as LoRAParams
from genlora_jax._masking import optimizer as optimizer
from genlora_jax._masking import trainable_mask as trainable_mask
from genlora_jax._merge import merge as merge
from genlora_jax._merge import unmerge as unmerge
from genlora_jax._rbf import ACTIVATIONS as ACTIVATIONS
from genlora_jax._rbf import generate_basis as generate_basis
from genlora_jax._rbf import instance_norm as instance_norm
from genlora_jax._rbf import rbf_features as rbf_features
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
    "AdapterConfig",
    "GenLoRAConfig",
    "GenLoRAParams",
    "LoRAConfig",
    "LoRAParams",
    "LowRankAdapter",
    "ParamCount",
    "adapted",
    "apply",
    "count_params",
    "find_targets",
    "generate_basis",
    "instance_norm",
    "join",
    "low_rank_delta",
    "merge",
    "model_params",
    "named_adapters",
    "optimizer",
    "rbf_features",
    "split",
    "summary",
    "trainable_mask",
    "unmerge",
    "wrap",
]
