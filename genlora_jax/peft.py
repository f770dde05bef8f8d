"""Hugging Face interoperability: PEFT LoRA adapters in and out, merged models out.

What each method exports as with `export_peft`:

- LoRA: itself.
- GenLoRA: the rank-r LoRA it generates (B and A materialised by the RBF
  generators), with PEFT's scale equal to GenLoRA's.
- MELoRA and any other `LowRankAdapter`: the rank-r LoRA of its `factors()`
  (block-diagonal for MELoRA).
- DoRA: LoRA with ``use_dora`` and the magnitude vector m = ‖W0‖ + offset.
- HiRA, LoRAN and other full-rank or nonlinear updates of W0: no PEFT form;
  export the merged model with `save_merged`.
- AuroRA (nonlinear in the activations): not mergeable; serve it with `apply`.

Module paths map one to one: the Flax path ``encoder/layer/0/attention/self/
query`` is the torch module ``encoder.layer.0.attention.self.query`` of the
same `transformers` architecture, and PEFT's keys add ``base_model.model.``
in front. Flax kernels are transposed to torch's (out, in) ``weight`` layout;
the factors A (r, n) and B (m, r) are already in it.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
import safetensors.flax
import safetensors.numpy

from genlora_jax import _guard
from genlora_jax._merge import merge
from genlora_jax._select import GPT2_CONV1D, is_transposed
from genlora_jax._tree import ADAPTER_KEY, Params, Site, flat, kernel_w, path_str, sites, unflat
from genlora_jax.methods.base import Adapter
from genlora_jax.methods.dora import DoRAConfig
from genlora_jax.methods.lora import LoRAConfig

PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
TORCH_WEIGHTS_NAME = "model.safetensors"
# Flax leaf name → torch parameter name.
_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def _torch_layout(name: str, value: jnp.ndarray) -> jnp.ndarray:
    """A Flax leaf in torch's layout: kernels (n, m) → (m, n), conv (h, w, i, o) → (o, i, h, w)."""
    if name != "kernel":
        return value
    return jnp.transpose(value, (3, 2, 0, 1)) if value.ndim == 4 else value.T


def _flax_layout(name: str, value: jnp.ndarray) -> jnp.ndarray:
    """Inverse of `_torch_layout`."""
    if name != "kernel":
        return value
    return jnp.transpose(value, (2, 3, 1, 0)) if value.ndim == 4 else value.T


def _torch_state_dict(params: Mapping) -> dict[str, jnp.ndarray]:
    """`transformers`' Flax → PyTorch names and layouts for plain (unwrapped) params.

    ``a/b/kernel`` → ``a.b.weight`` in torch's layout; ``scale`` and
    ``embedding`` → ``weight``; other leaves keep their names (the rules of
    ``transformers.modeling_flax_pytorch_utils``).
    """
    return {
        ".".join((*key[:-1], _TORCH_LEAF.get(key[-1], key[-1]))): _torch_layout(
            key[-1], jnp.asarray(leaf)
        )
        for key, leaf in flat(params).items()
    }


def _peft_factors(site: Site) -> dict[str, np.ndarray]:
    """PEFT's tensors for one module: lora_A (r, n), lora_B (m, r) [, magnitude (m,)]."""
    if site.layers:
        raise ValueError(
            f"{site.name}: the adapter is stacked over the layers of an `nn.scan`; PEFT needs "
            "one module per layer, so export the per-layer (unscanned) model's params."
        )
    try:
        tensors = site.adapter.to_lora(site.w0())
    except ValueError as err:
        raise ValueError(f"{site.name}: {err}") from None
    return {
        f"{k}.weight" if k != "lora_magnitude_vector" else k: np.asarray(v, np.float32)
        for k, v in tensors.items()
    }


def _alpha(adapter: Adapter, rank: int, rslora: bool) -> float | int:
    """PEFT's lora_alpha giving PEFT's scale (α/r, or α/√r) = the adapter's scale."""
    alpha = adapter.config.scale * (math.sqrt(rank) if rslora else rank)
    return round(alpha) if math.isclose(alpha, round(alpha), rel_tol=1e-12) else alpha


def _target_modules(params: Mapping, paths: list[str], module_prefix: str) -> list[str]:
    """Module names when they select exactly ``paths`` (PEFT's usual form), else full paths."""
    names = {p.rsplit("/", 1)[-1] for p in paths}
    selected = {
        path_str(key[:-1])
        for key, leaf in flat(params).items()
        if key[-1] == "kernel" and key[-2] in names and key[0] != ADAPTER_KEY and leaf.ndim == 2
    }
    if selected == set(paths):
        return sorted(names)
    return [module_prefix + p.replace("/", ".") for p in paths]


def _extras(params: Mapping, module_prefix: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """PEFT tensors and ``modules_to_save`` for the extra trainable leaves."""
    tensors = _torch_state_dict(params.get(ADAPTER_KEY, {}))
    modules = sorted({module_prefix + name.rsplit(".", 1)[0] for name in tensors})
    out = {
        f"{PEFT_PREFIX}{module_prefix}{k}": np.asarray(v, np.float32) for k, v in tensors.items()
    }
    return out, modules


def export_peft(
    params: Mapping,
    out_dir: str | os.PathLike,
    *,
    module_prefix: str = "",
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> dict[str, Any]:
    """Writes the adapters of ``params`` as a PEFT LoRA adapter.

    ``out_dir`` gets ``adapter_config.json`` and ``adapter_model.safetensors``
    (float32), loadable with ``peft.PeftModel.from_pretrained(torch_model,
    out_dir)`` and by LoRA servers that read PEFT adapters (vLLM, TGI). PEFT's
    scale equals the adapter's (``lora_alpha`` = s·r, or s·√r when every
    adapter uses rsLoRA); modules whose rank or α differ from the most common
    get ``rank_pattern`` / ``alpha_pattern`` entries. Extra trainable leaves
    become ``modules_to_save``. See the module docstring for what each method
    exports as.

    Args:
        params: a wrapped tree (from `wrap`).
        out_dir: created if needed.
        module_prefix: prepended to every torch module path, when the torch
            model nests the Flax params' root, e.g. ``"bert."`` for adapters
            trained on ``FlaxBertModel`` and loaded into
            ``BertForSequenceClassification``.
        base_model_name_or_path: recorded in the config (the Hub id).
        task_type: PEFT's task type ("CAUSAL_LM", "SEQ_CLS", ...), or None.

    Returns:
        The adapter config written.

    Raises:
        ValueError: an adapter has no low-rank form (HiRA, LoRAN, AuroRA; the
            message says what to do instead), or DoRA is mixed with other
            methods.
    """
    found = sorted(sites(params), key=lambda site: site.name)
    if not found:
        raise ValueError("params carry no adapters; wrap and train them first.")
    adapters = [site.adapter for site in found]
    dora = {a.peft_use_dora for a in adapters}
    if len(dora) > 1:
        raise ValueError("PEFT's use_dora holds for every module; DoRA cannot be mixed with LoRA.")
    rslora = all(a.config.rslora for a in adapters)
    tensors, ranks, alphas = {}, {}, {}
    for site in found:
        module = module_prefix + site.name.replace("/", ".")
        for name, value in _peft_factors(site).items():
            tensors[f"{PEFT_PREFIX}{module}.{name}"] = value
        ranks[module] = tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"].shape[0]
        alphas[module] = _alpha(site.adapter, ranks[module], rslora)
    pairs = collections.Counter((ranks[m], alphas[m]) for m in ranks)
    r, alpha = pairs.most_common(1)[0][0]
    extra_tensors, modules_to_save = _extras(params, module_prefix)
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": rslora,
        "use_dora": dora == {True},
        "rank_pattern": {m: v for m, v in ranks.items() if v != r},
        "alpha_pattern": {m: v for m, v in alphas.items() if v != alpha},
        "target_modules": _target_modules(params, [s.name for s in found], module_prefix),
        "modules_to_save": modules_to_save or None,
        "lora_dropout": max(a.config.dropout for a in adapters),
        "fan_in_fan_out": any(a.kernel_transposed for a in adapters),
        "bias": "none",
        "inference_mode": True,
    }
    os.makedirs(out_dir, exist_ok=True)
    weights = {k: np.ascontiguousarray(v) for k, v in {**tensors, **extra_tensors}.items()}
    safetensors.numpy.save_file(weights, os.path.join(out_dir, WEIGHTS_NAME), {"format": "pt"})
    with open(os.path.join(out_dir, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return config


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rule: the first pattern key matching the end of the module path."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_peft_config(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    path = os.path.join(adapter_dir, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{adapter_dir} has no {CONFIG_NAME}; pass the folder PEFT's save_pretrained wrote."
        )
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}).") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds {type(config).__name__}, not a PEFT config object.")
    return config


def _split_key(key: str, module_prefix: str) -> tuple[str, str]:
    """'base_model.model.<prefix><module>.<name>' → (Flax module path, name)."""
    head = PEFT_PREFIX + module_prefix
    if not key.startswith(head):
        raise ValueError(
            f"PEFT key {key!r} does not start with {head!r}; pass the module_prefix the adapter "
            "was saved with (e.g. 'bert.' for a BertForSequenceClassification adapter loaded "
            "onto FlaxBertModel params)."
        )
    rest = key[len(head) :]
    names = (
        "lora_A.weight",
        "lora_B.weight",
        "lora_magnitude_vector.weight",
        "lora_magnitude_vector",
    )
    for name in names:
        if rest.endswith("." + name):
            return rest[: -len(name) - 1].replace(".", "/"), name.removesuffix(".weight")
    module, _, name = rest.rpartition(".")
    if name.startswith("lora_"):
        raise ValueError(f"PEFT tensor {key!r} ({name}) is not supported; only Linear LoRA is.")
    return module.replace(".", "/"), name


def import_peft(
    params: Mapping,
    adapter_dir: str | os.PathLike,
    *,
    module_prefix: str = "",
    transposed_kernels: str | None = GPT2_CONV1D,
) -> Params:
    """Loads a PEFT LoRA (or DoRA) adapter onto base ``params``.

    The inverse of `export_peft`: every module with ``lora_A``/``lora_B``
    gets a `LoRAParams` (`DoRAParams` with ``use_dora``) holding the file's
    factors, with the rank from their shape and PEFT's α, rsLoRA flag and
    patterns, so the adapted model computes what PEFT computes; the
    ``modules_to_save`` tensors become extra trainable leaves.

    Args:
        params: the base params of the same architecture, without adapters.
        adapter_dir: a folder with ``adapter_config.json`` and
            ``adapter_model.safetensors``.
        module_prefix: the torch module prefix to strip (see `export_peft`).
        transposed_kernels: as in `wrap` (GPT-2 ``Conv1D`` modules by default).

    Returns:
        The wrapped tree.

    Raises:
        ValueError: not a LoRA adapter, an unsupported tensor (embedding LoRA,
            trained biases), a module that ``params`` lack, or factor shapes
            that do not fit the kernel.
    """
    config = _read_peft_config(adapter_dir)
    if config.get("peft_type") != "LORA" or config.get("bias", "none") != "none":
        raise ValueError(
            f"{adapter_dir}: peft_type={config.get('peft_type')!r}, bias={config.get('bias')!r}; "
            "only LoRA/DoRA adapters without trained biases can be imported."
        )
    if not isinstance(config.get("lora_alpha"), int | float) or config["lora_alpha"] <= 0:
        raise ValueError(
            f"{adapter_dir}/{CONFIG_NAME}: lora_alpha is {config.get('lora_alpha')!r}; a PEFT "
            "LoRA config needs a positive lora_alpha (the file is incomplete or not PEFT's)."
        )
    weights = os.path.join(adapter_dir, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{adapter_dir} has no {WEIGHTS_NAME}; expected PEFT's weights.")
    try:
        tensors = safetensors.flax.load_file(weights)
    except Exception as err:
        raise ValueError(
            f"{weights} is not a readable safetensors file ({type(err).__name__}: {err}); "
            "it is truncated or corrupted."
        ) from None
    modules: dict[str, dict[str, Any]] = collections.defaultdict(dict)
    extras: dict[str, dict[str, Any]] = collections.defaultdict(dict)
    for key, value in tensors.items():
        module, name = _split_key(key, module_prefix)
        (modules if name.startswith("lora_") else extras)[module][name] = value
    leaves = flat(params)
    if any(ADAPTER_KEY in key for key in leaves):
        raise ValueError(
            f"params already carry adapters (a {ADAPTER_KEY!r} key); import onto the base tree "
            "(`genlora_jax.split(params)[0]`)."
        )
    make = DoRAConfig if config.get("use_dora") else LoRAConfig
    needed = {"lora_A", "lora_B"} | ({"lora_magnitude_vector"} if config.get("use_dora") else set())
    for module, factors in modules.items():
        torch_module = module_prefix + module.replace("/", ".")
        path = tuple(module.split("/"))
        missing = sorted(needed - set(factors))
        if missing:
            raise ValueError(
                f"{weights}: module {torch_module!r} has {sorted(factors)} but lacks {missing}; "
                "the adapter file is incomplete (every adapted module needs both factors)."
            )
        kernel = leaves.get((*path, "kernel"))
        if kernel is None:
            raise ValueError(
                f"the adapter adapts {torch_module!r} but these params have no kernel at "
                f"{module!r}; check module_prefix (e.g. 'bert.' when the adapter was saved for "
                "BertForSequenceClassification and the params are FlaxBertModel's)."
            )
        transposed = is_transposed(transposed_kernels, path)
        w0 = kernel_w(kernel, transposed)
        _check_factor_shapes(module, factors, w0.shape)
        cfg = make(
            rank=factors["lora_A"].shape[0],
            alpha=_pattern_value(
                config.get("alpha_pattern") or {}, torch_module, config["lora_alpha"]
            ),
            rslora=bool(config.get("use_rslora")),
            dropout=float(config.get("lora_dropout") or 0.0),
        )
        leaves[(*path, ADAPTER_KEY)] = cfg.from_lora(factors, w0=w0, kernel_transposed=transposed)
    for module, tensors_of_module in extras.items():
        path = tuple(module.split("/"))
        owned = [key for key in leaves if key[:-1] == path]
        for key in owned:
            torch_name = _TORCH_LEAF.get(key[-1], key[-1])
            if torch_name in tensors_of_module:
                value = jnp.asarray(tensors_of_module.pop(torch_name), leaves[key].dtype)
                leaves[(ADAPTER_KEY, *key)] = _flax_layout(key[-1], value)
                del leaves[key]
        if tensors_of_module:
            raise ValueError(
                f"{module}: PEFT tensors {sorted(tensors_of_module)} have no Flax counterpart."
            )
    _guard.install()
    return unflat(leaves)


def _check_factor_shapes(module: str, factors: Mapping[str, Any], w_shape: tuple[int, int]) -> None:
    m, n = w_shape
    r = factors["lora_A"].shape[0]
    a, b = factors["lora_A"].shape, factors["lora_B"].shape
    if a != (r, n) or b != (m, r):
        raise ValueError(
            f"{module}: PEFT factors A {a}, B {b} do not fit the kernel, which needs "
            f"A {(r, n)}, B {(m, r)}; the adapter is for another model."
        )


def save_merged(
    model: Any, params: Mapping, out_dir: str | os.PathLike, *, torch_weights: bool = True
) -> None:
    """Saves the model with every adapter merged, loadable without this library.

    Writes ``config.json`` and ``flax_model.msgpack`` with the model's own
    ``save_pretrained``, so the Flax class of the architecture loads it
    (``FlaxBertModel.from_pretrained(out_dir)``), and with ``torch_weights``
    also ``model.safetensors`` in PyTorch names and layouts, so the torch
    class loads it too (``BertModel.from_pretrained(out_dir)``, vLLM, ...).
    Each loader picks its own file.

    Args:
        model: the `transformers` Flax model the params belong to.
        params: a wrapped tree; `merge` folds every adapter into its kernel.
        out_dir: the output folder.
        torch_weights: also write the PyTorch ``model.safetensors``.
    """
    merged = merge(params)
    model.save_pretrained(out_dir, params=merged)
    if torch_weights:
        path = os.path.join(out_dir, TORCH_WEIGHTS_NAME)
        safetensors.flax.save_file(_torch_state_dict(merged), path, {"format": "pt"})
