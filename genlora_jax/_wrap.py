"""Attaching adapters to a parameter pytree, and taking them off again.

Layout of a wrapped tree (``ADAPTER_KEY = "genlora"``)::

    params["encoder"]["layer"]["0"]["attention"]["self"]["query"] = {
        "kernel": W0ᵀ (n, m),   "bias": (m,),       # the base, untouched
        "genlora": GenLoRAParams(z_a, theta_a, z_b, theta_b, config=...),
    }
    params["genlora"] = {"classifier": {"kernel": ..., "bias": ...}}  # extras

An adapter sits beside the kernel it adapts, so `flax.linen.scan` slices
stacked adapters with their layer and the interceptor finds them through the
module's own variables. Layers under ``nn.scan(..., variable_axes={"params": 0})``
store stacked kernels (L, n, m); ``wrap(..., stacked=...)`` gives their adapters
the same leading layer axis, one independently initialised adapter per layer.

Extra trainable leaves (a task head; PEFT's ``modules_to_save``) move under
the root key, so the tree alone says what trains: everything under a
``"genlora"`` key is adapter state, the rest is the frozen base.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
from flax import traverse_util
from flax.core import unfreeze
from jaxtyping import PRNGKeyArray

from genlora_jax import _guard
from genlora_jax._adapter import ADAPTER_KEY, Adapter, AdapterConfig
from genlora_jax._genlora import GenLoRAConfig

# GPT-2-style `Conv1D` modules store W0 itself, (m, n), not W0ᵀ.
GPT2_CONV1D = r"(.*/)?(c_attn|c_proj|c_fc|q_attn)"

Path = tuple[str, ...]
Params = dict[str, Any]
_NAME = re.compile(r"[A-Za-z0-9_\-]+")


def path_str(path: Path) -> str:
    """'encoder/layer/0/attention/self/query', the form targets match against."""
    return "/".join(str(p) for p in path)


def matches(pattern: str, path: Path) -> bool:
    """A bare name matches the last path component; anything else is a regex
    that must match the whole '/'-joined path (``re.fullmatch``)."""
    if _NAME.fullmatch(pattern):
        return bool(path) and path[-1] == pattern
    return re.fullmatch(pattern, path_str(path)) is not None


def _flat(params: Mapping) -> dict[Path, Any]:
    return traverse_util.flatten_dict(unfreeze(params))


def _kernels(flat: Mapping[Path, Any]) -> dict[Path, tuple[int, ...]]:
    """Module path → kernel shape, for every module holding a 'kernel'."""
    return {key[:-1]: tuple(leaf.shape) for key, leaf in flat.items() if key[-1] == "kernel"}


def _listing(kernels: Mapping[Path, tuple[int, ...]]) -> str:
    names: dict[str, int] = {}
    for path, shape in kernels.items():
        if len(shape) == 2:
            names[path[-1]] = names.get(path[-1], 0) + 1
    example = next((path_str(p) for p, s in kernels.items() if len(s) == 2), "none")
    shown = ", ".join(f"{n} ({c})" for n, c in sorted(names.items()))
    return f"modules with a 2-D kernel, by name (count): {shown or 'none'}; e.g. {example!r}"


def _is_stacked(stacked: str | None, path: Path) -> bool:
    """Whether the module or one of its ancestors matches ``stacked``."""
    return stacked is not None and any(matches(stacked, path[:i]) for i in range(1, len(path) + 1))


def find_targets(
    params: Mapping, targets: Sequence[str], *, stacked: str | None = None
) -> list[Path]:
    """Module paths of the 2-D projections that ``targets`` select, sorted.

    Args:
        params: the base parameter tree.
        targets: module names or path regexes, as in `wrap`.
        stacked: as in `wrap`; the modules it matches may have kernels with
            leading layer axes.

    Raises:
        ValueError: a target matches no module, or matches a module whose
            kernel is not 2-D; the message lists what could be targeted.
    """
    if isinstance(targets, str):
        targets = [targets]
    if not targets:
        raise ValueError("targets is empty; name at least one module, e.g. ['q_proj'].")
    kernels = _kernels(_flat(params))
    selected: set[Path] = set()
    for target in targets:
        hits = [p for p in kernels if matches(target, p)]
        bad = [
            p
            for p in hits
            if len(kernels[p]) != 2 and not (len(kernels[p]) > 2 and _is_stacked(stacked, p))
        ]
        if bad and (_NAME.fullmatch(target) or len(bad) == len(hits)):
            shown = ", ".join(f"{path_str(p)} {kernels[p]}" for p in bad[:4])
            hint = ""
            if any(len(kernels[p]) > 2 for p in bad):
                hint = (
                    " Layers under `nn.scan` have stacked kernels (L, n, m): name the scanned "
                    "module with `stacked=`."
                )
            raise ValueError(
                f"target {target!r} matched modules whose kernel is not 2-D ({shown}); only "
                f"2-D projections can be adapted. {_listing(kernels)}.{hint}"
            )
        if not hits:
            raise ValueError(f"no module matched target {target!r}. {_listing(kernels)}.")
        selected.update(hits)
    return sorted(selected)


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
    for pattern, override in overrides.items():
        if matches(pattern, path):
            if isinstance(override, AdapterConfig):
                config = override
            else:
                try:
                    config = dataclasses.replace(config, **override)
                except TypeError as err:
                    fields = sorted(f.name for f in dataclasses.fields(config))
                    raise TypeError(
                        f"overrides[{pattern!r}] = {dict(override)!r} does not fit "
                        f"{type(config).__name__} ({err}); its fields are {fields}."
                    ) from None
    return config


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
            e.g. ``{"v_proj": {"rank": 16}}``; later patterns win.
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
    flat = _flat(params)
    if any(ADAPTER_KEY in key for key in flat):
        raise ValueError(
            f"params already carry adapters (a {ADAPTER_KEY!r} key); wrap the base tree "
            "(`genlora_jax.split(params)[0]`) or `genlora_jax.merge(params)` first."
        )
    paths = find_targets(params, targets, stacked=stacked)
    _check_overrides(overrides or {}, paths)
    extra = _extra_keys(flat, extra_trainable)
    clash = [key for key in extra if key[:-1] in paths]
    if clash:
        raise ValueError(f"{path_str(clash[0])} is both a target and extra_trainable; pick one.")
    out = {(ADAPTER_KEY, *key) if key in extra else key: leaf for key, leaf in flat.items()}
    for path, key in zip(paths, jax.random.split(rng, len(paths)), strict=True):
        transposed = (
            bool(transposed_kernels)
            and re.fullmatch(transposed_kernels, path_str(path)) is not None
        )
        shape = flat[(*path, "kernel")].shape
        n, m = shape[-2:][:: -1 if transposed else 1]
        cfg = _config_for(path, config, overrides or {})
        init = functools.partial(
            cfg.init, m=m, n=n, kernel_transposed=transposed, path=path_str(path)
        )
        out[(*path, ADAPTER_KEY)] = _init_per_layer(init, key, shape[:-2])
    _guard.install()
    return traverse_util.unflatten_dict(out)


def _init_per_layer(init, key: PRNGKeyArray, layers: tuple[int, ...]) -> Adapter:
    """``init(key)``, or for stacked layers (L, ...) one adapter per layer index,
    each from its own key, with the layer axes leading every array."""
    if not layers:
        return init(key)
    for _ in layers:
        init = jax.vmap(init)
    return init(jax.random.split(key, layers))


def _extra_keys(flat: Mapping[Path, Any], patterns: Iterable[str]) -> set[Path]:
    """Leaf keys that lie in (or are) a module or leaf matched by a pattern."""
    if isinstance(patterns, str):
        patterns = [patterns]
    keys: set[Path] = set()
    for pattern in patterns:
        hits = {
            key for key in flat if any(matches(pattern, key[:i]) for i in range(1, len(key) + 1))
        }
        if not hits:
            modules = sorted({key[-2] for key in flat if len(key) > 1})
            raise ValueError(
                f"extra_trainable pattern {pattern!r} matched no module or leaf; "
                f"module names present: {', '.join(modules)}."
            )
        keys |= hits
    return keys


def split(params: Mapping) -> tuple[Params, Params]:
    """(base, adapters): two disjoint trees; ``join`` puts them back.

    ``adapters`` keeps full paths, so it holds every ``"genlora"`` entry
    (adapter nodes and extra trainable leaves) and nothing of the base.
    """
    base, adapters = {}, {}
    for key, leaf in _flat(params).items():
        (adapters if ADAPTER_KEY in key else base)[key] = leaf
    return traverse_util.unflatten_dict(base), traverse_util.unflatten_dict(adapters)


def join(base: Mapping, adapters: Mapping) -> Params:
    """Inverse of `split`."""
    _guard.install()
    return traverse_util.unflatten_dict({**_flat(base), **_flat(adapters)})


def named_adapters(params: Mapping) -> dict[str, Adapter]:
    """Module path → adapter, for every adapted projection in the tree."""
    return {
        path_str(key[:-1]): leaf
        for key, leaf in _flat(params).items()
        if key[-1] == ADAPTER_KEY and isinstance(leaf, Adapter)
    }


def model_params(params: Mapping) -> Params:
    """The tree the model is called with: extras back in place, adapters kept
    beside their kernels for the interceptor to read."""
    flat = {}
    for key, leaf in _flat(params).items():
        extra = key[0] == ADAPTER_KEY and not isinstance(leaf, Adapter)
        flat[key[1:] if extra else key] = leaf
    return traverse_util.unflatten_dict(flat)
