"""The adapter methods: GenLoRA, the baselines, their base classes, one registry.

Every method is a config (`AdapterConfig`, frozen hyper-parameters with an
``init``) and a params node (`Adapter`, the arrays of one adapted projection).
`REGISTRY` maps each config's ``method`` name to its class, so command lines
and presets name methods by the same string that a config reports::

    >>> import genlora_jax as gl
    >>> gl.methods.config("genlora", rank=8, groups=16)
    GenLoRAConfig(rank=8, alpha=None, rslora=False, dropout=0.0, groups=16, ...)

To add a method, subclass `AdapterConfig` (with a ``method`` name and an
``init``) and `Adapter` (or `LowRankAdapter`, which needs only ``factors``),
then `register` the config class.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from genlora_jax.methods.aurora import AuroRAConfig, AuroRAParams
from genlora_jax.methods.base import (
    Adapter,
    AdapterConfig,
    Factors,
    LowRankAdapter,
    lora_factors,
    low_rank_delta,
)
from genlora_jax.methods.dora import DoRAConfig, DoRAParams
from genlora_jax.methods.genlora import GenLoRAConfig, GenLoRAParams
from genlora_jax.methods.hira import HiRAConfig, HiRAParams
from genlora_jax.methods.lora import LoRAConfig, LoRAParams
from genlora_jax.methods.loran import LoRANConfig, LoRANParams
from genlora_jax.methods.melora import MELoRAConfig, MELoRAParams

_REGISTRY: dict[str, type[AdapterConfig]] = {}
REGISTRY: Mapping[str, type[AdapterConfig]] = MappingProxyType(_REGISTRY)
"""Method name (``config.method``) → config class, read-only; see `register`."""


def register(config_class: type[AdapterConfig]) -> type[AdapterConfig]:
    """Adds a config class under its ``method`` name (usable as a decorator)."""
    if not (isinstance(config_class, type) and issubclass(config_class, AdapterConfig)):
        raise TypeError(f"register takes an AdapterConfig subclass, got {config_class!r}.")
    name = getattr(config_class, "method", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{config_class.__name__} has no `method` name (a ClassVar[str]).")
    known = _REGISTRY.get(name)
    if known is not None and known is not config_class:
        raise ValueError(f"method {name!r} is already registered by {known.__name__}.")
    _REGISTRY[name] = config_class
    return config_class


def get(method: str) -> type[AdapterConfig]:
    """The config class of ``method`` ("genlora", "lora", "dora", ...)."""
    try:
        return _REGISTRY[method]
    except KeyError:
        raise ValueError(
            f"unknown method {method!r}; known methods: {sorted(_REGISTRY)}."
        ) from None


def config(method: str, **fields: Any) -> AdapterConfig:
    """``get(method)(**fields)``, e.g. ``config("lora", rank=16)``."""
    return get(method)(**fields)


for _cls in (
    GenLoRAConfig,
    LoRAConfig,
    DoRAConfig,
    HiRAConfig,
    MELoRAConfig,
    AuroRAConfig,
    LoRANConfig,
):
    register(_cls)
del _cls

__all__ = [
    "REGISTRY",
    "Adapter",
    "AdapterConfig",
    "AuroRAConfig",
    "AuroRAParams",
    "DoRAConfig",
    "DoRAParams",
    "Factors",
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
    "config",
    "get",
    "lora_factors",
    "low_rank_delta",
    "register",
]
