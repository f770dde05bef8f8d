"""genlora_jax: GenLoRA (LoRA with RBF-generated factors) and its baselines in JAX/Flax.

Paper: Ouyang, Li, et al., "Nonlinearity as Rank: Generative Low-Rank Adapters
with Radial Basis Functions", arXiv 2602.05709 (2026).

The top level holds what a training script calls: the method configs, `wrap`
and its inverses, `apply`/`adapted`, `merge`/`unmerge`, the optimizer mask,
counts and the checkpointer. The rest lives in submodules:

- `genlora_jax.methods`: adapter classes, the registry, the RBF generator.
- `genlora_jax.analysis`: spectra of ΔW, RBF reconstruction, figures.
- `genlora_jax.checkpoint`: `AdapterCheckpointer` and its errors.
- `genlora_jax.peft`: PEFT LoRA files in and out, merged `transformers` models.
- `genlora_jax.sharding`: partition specs for device meshes.
- `genlora_jax.models`: llama GGUF files as Flax models.
"""

import importlib
import warnings
from typing import Any

from genlora_jax import analysis, checkpoint, methods, peft, sharding
from genlora_jax._count import ParamCount, compare_methods, count_params, summary
from genlora_jax._guard import AdapterNotAppliedError
from genlora_jax._intercept import adapted, apply, pregenerate
from genlora_jax._masking import optimizer, trainable_mask
from genlora_jax._merge import inference_params, merge, unmerge
from genlora_jax._precision import cast_base
from genlora_jax._select import find_targets
from genlora_jax._tree import ADAPTER_KEY, model_params, named_adapters, split
from genlora_jax._wrap import join, wrap
from genlora_jax.checkpoint import AdapterCheckpointer
from genlora_jax.methods import (
    AuroRAConfig,
    DoRAConfig,
    GenLoRAConfig,
    HiRAConfig,
    LoRAConfig,
    LoRANConfig,
    MELoRAConfig,
)

__version__ = "0.2.0"

__all__ = [
    "ADAPTER_KEY",
    "AdapterCheckpointer",
    "AdapterNotAppliedError",
    "AuroRAConfig",
    "DoRAConfig",
    "GenLoRAConfig",
    "HiRAConfig",
    "LoRAConfig",
    "LoRANConfig",
    "MELoRAConfig",
    "ParamCount",
    "adapted",
    "analysis",
    "apply",
    "cast_base",
    "checkpoint",
    "compare_methods",
    "count_params",
    "find_targets",
    "inference_params",
    "join",
    "merge",
    "methods",
    "model_params",
    "named_adapters",
    "optimizer",
    "peft",
    "pregenerate",
    "sharding",
    "split",
    "summary",
    "trainable_mask",
    "unmerge",
    "wrap",
]

# Names of 0.1 that moved into submodules: old name → "submodule.name".
_MOVED = {
    **{
        name: f"methods.{name}"
        for name in (
            "Adapter",
            "AdapterConfig",
            "LowRankAdapter",
            "low_rank_delta",
            "AuroRAParams",
            "DoRAParams",
            "GenLoRAParams",
            "HiRAParams",
            "LoRAParams",
            "LoRANParams",
            "MELoRAParams",
        )
    },
    **{
        name: f"methods.rbf.{name}"
        for name in ("ACTIVATIONS", "generate_basis", "instance_norm", "rbf_features")
    },
    **{name: f"analysis.{name}" for name in analysis.__all__ if name != "PAPER_THRESHOLD"},
    **{name: f"checkpoint.{name}" for name in ("Checkpoint", "CorruptCheckpointError")},
    **{
        name: f"peft.{name}"
        for name in ("export_peft", "import_peft", "save_merged", "GPT2_CONV1D")
    },
    **{
        name: f"sharding.{name}"
        for name in ("partition_specs", "shard", "shardings", "state_shardings")
    },
}


def __getattr__(name: str) -> Any:
    """The 0.1 names that moved into submodules still resolve, with a warning."""
    where = _MOVED.get(name)
    if where is None:
        raise AttributeError(f"module 'genlora_jax' has no attribute {name!r}")
    module, _, attr = where.rpartition(".")
    warnings.warn(
        f"genlora_jax.{name} moved to genlora_jax.{where}; the old name will be removed.",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(f"genlora_jax.{module}"), attr)
