"""Attaching adapters to a parameter pytree (`wrap`, `join`).

The layout of the result is `genlora_jax._tree`'s; which modules are adapted
is `genlora_jax._select`'s. Layers under ``nn.scan(..., variable_axes=
{"params": 0})`` store stacked kernels (L, n, m); ``wrap(..., stacked=...)``
gives their adapters the same leading layer axis, one independently
initialised adapter per layer.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jaxtyping import PRNGKeyArray

from genlora_jax import _guard
from genlora_jax._select import (
    GPT2_CONV1D,
    extra_keys,
    find_targets,
    first_match,
    is_transposed,
    matches,
)
from genlora_jax._tree import ADAPTER_KEY, Params, Path, flat, path_str, unflat
from genlora_jax.methods.base import Adapter, AdapterConfig
from genlora_jax.methods.genlora import GenLoRAConfig


def _check_config(config: Any, what: str) -> None:
    if isinstance(config, type) and issubclass(config, AdapterConfig):
        raise TypeError(
            f"{what} is the class {config.__name__}, not a config; pass an instance, "
            f"e.g. {config.__name__}(rank=8)."
        )
    if not isinstance(config, AdapterConfig):
        raise TypeError(
            f"{what} must be an AdapterConfig instance (e.g. GenLoRAConfig()), got "
            f"{type(config).__name__}."
        )


def check_rng(rng: Any, what: str = "rng") -> None:
    """Raises unless ``rng`` is a typed PRNG key or a raw uint32 key of shape (2,)."""
    dtype = getattr(rng, "dtype", None)
    typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    raw = dtype == "uint32" and getattr(rng, "shape", None) == (2,)
    if not (typed or raw):
        raise TypeError(
            f"{what} must be a PRNG key such as jax.random.key(0), got {rng!r:.60}; "
            "to seed with an integer, pass jax.random.key(seed)."
        )


def _check_overrides(
    overrides: Mapping[str, AdapterConfig | Mapping], paths: Sequence[Path]
) -> None:
    """Every override must be a config or a dict of fields, and must match a target."""
    for pattern, override in overrides.items():
        if not isinstance(override, Mapping):
            _check_config(override, f"overrides[{pattern!r}]")
        if not any(matches(pattern, path) for path in paths):
            shown = ", ".join(path_str(p) for p in paths[:3])
            raise ValueError(
                f"overrides pattern {pattern!r} matches none of the {len(paths)} targeted "
                f"modules (e.g. {shown}); it would change nothing. Fix the pattern (a module "
                "name or a regex over the whole path) or drop it."
            )


def _config_for(
    path: Path, config: AdapterConfig, overrides: Mapping[str, AdapterConfig | Mapping]
) -> AdapterConfig:
    """The config of the module at ``path``: the first matching override, else ``config``."""
    hit = first_match(overrides.items(), path)
    if hit is None:
        return config
    pattern, override = hit
    if isinstance(override, AdapterConfig):
        return override
    try:
        return dataclasses.replace(config, **override)
    except TypeError as err:
        fields = sorted(f.name for f in dataclasses.fields(config))
        raise TypeError(
            f"overrides[{pattern!r}] = {dict(override)!r} does not fit "
            f"{type(config).__name__} ({err}); its fields are {fields}."
        ) from None


def wrap(
    params: Mapping,
    targets: Sequence[str],
    config: AdapterConfig | None = None,
    *,
    rng: PRNGKeyArray | None = None,
    overrides: Mapping[str, AdapterConfig | Mapping[str, Any]] | None = None,
    extra_trainable: Sequence[str] = (),
    transposed_kernels: str | None = GPT2_CONV1D,
    stacked: str | None = None,
) -> Params:
    """Returns ``params`` with an adapter beside every targeted projection.

    Works on the params of an unchanged Flax model (``model.params`` of a
    `transformers` Flax model, or ``variables["params"]`` of a linen module),
    and on `jax.ShapeDtypeStruct` trees under `jax.eval_shape`.

    Args:
        params: the base parameter tree; it is not modified.
        targets: module names ("q_proj") or regexes over the module path
            ("model/layers/[0-3]/self_attn/(q|v)_proj").
        config: the method and its hyper-parameters (default `GenLoRAConfig()`).
        rng: initialises the adapters (default ``jax.random.key(0)``).
        overrides: pattern → config, or pattern → dict of fields to change,
            e.g. ``{"v_proj": {"rank": 16}}``; for each module the first
            matching pattern wins (the rule of `genlora_jax.sharding` too).
        extra_trainable: patterns of modules or leaves that train in full
            (a classification head); they move under ``params["genlora"]``.
        transposed_kernels: regex (full match on the module path) of modules
            whose kernel is stored (m, n), as GPT-2's ``Conv1D``.
        stacked: pattern (a name or a path regex, like a target) of a module
            run under ``nn.scan`` with ``variable_axes={"params": 0}``; it
            applies to that module and everything inside it. There, every
            kernel axis before the last two is a layer axis, e.g. (L, n, m),
            and the adapter's arrays get the same leading axes (one adapter
            per layer, each with its own key), which ``nn.scan`` slices with
            the kernel.

    Returns:
        The wrapped tree (see the module docstring for its layout).

    Example:
        >>> import jax, jax.numpy as jnp, genlora_jax as gl
        >>> base = {"q_proj": {"kernel": jnp.ones((32, 16)), "bias": jnp.zeros(16)}}
        >>> p = gl.wrap(base, targets=["q_proj"], config=gl.GenLoRAConfig(rank=4, groups=4))
        >>> p["q_proj"]["genlora"].theta_a.shape
        (4, 4, 16)
    """
    config = GenLoRAConfig() if config is None else config
    _check_config(config, "config")
    rng = jax.random.key(0) if rng is None else rng
    check_rng(rng)
    leaves = flat(params)
    if any(ADAPTER_KEY in key for key in leaves):
        raise ValueError(
            f"params already carry adapters (a {ADAPTER_KEY!r} key); wrap the base tree "
            "(`genlora_jax.split(params)[0]`) or `genlora_jax.merge(params)` first."
        )
    paths = find_targets(params, targets, stacked=stacked)
    _check_overrides(overrides or {}, paths)
    extra = extra_keys(leaves, extra_trainable)
    frozen_blocks = [key for key in extra if hasattr(leaves[key], "dequantize")]
    if frozen_blocks:
        raise ValueError(
            f"extra_trainable selects {path_str(frozen_blocks[0])}, a quantized kernel, which "
            "cannot train; keep that module in float (genlora_jax.quant.quantize_base(..., "
            "skip=(name,))) or dequantize it first."
        )
    clash = [key for key in extra if key[:-1] in paths]
    if clash:
        raise ValueError(f"{path_str(clash[0])} is both a target and extra_trainable; pick one.")
    out = {(ADAPTER_KEY, *key) if key in extra else key: leaf for key, leaf in leaves.items()}
    for path, key in zip(paths, jax.random.split(rng, len(paths)), strict=True):
        transposed = is_transposed(transposed_kernels, path)
        shape = leaves[(*path, "kernel")].shape
        n, m = shape[-2:][:: -1 if transposed else 1]
        cfg = _config_for(path, config, overrides or {})
        init = functools.partial(
            cfg.init, m=m, n=n, kernel_transposed=transposed, path=path_str(path)
        )
        out[(*path, ADAPTER_KEY)] = _init_per_layer(init, key, shape[:-2])
    _guard.install()
    return unflat(out)


def _init_per_layer(init, key: PRNGKeyArray, layers: tuple[int, ...]) -> Adapter:
    """``init(key)``, or for stacked layers (L, ...) one adapter per layer index,
    each from its own key, with the layer axes leading every array."""
    if not layers:
        return init(key)
    for _ in layers:
        init = jax.vmap(init)
    return init(jax.random.split(key, layers))


def join(base: Mapping, adapters: Mapping) -> Params:
    """Inverse of `split`: the wrapped tree from its base and adapter halves."""
    _guard.install()
    return unflat({**flat(base), **flat(adapters)})
