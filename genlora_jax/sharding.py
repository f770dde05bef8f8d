"""Placing a wrapped tree on a device mesh with JAX's own SPMD.

Nothing here runs in parallel by itself: these helpers only say where every
leaf lives (a `jax.sharding.NamedSharding` per leaf), and ``jax.jit`` with
those shardings partitions the train step, inserting the collectives.

The default layout is FSDP for the frozen base and replication for the
adapters: a base leaf with two or more axes is split along its largest axis
that the mesh divides; adapter leaves (everything under a ``"genlora"`` key)
are small and stay whole on every device. Rules override either, e.g.
tensor parallelism by path::

    rules = [
        (r".*(q|k|v)_proj/kernel", P(None, "model")),   # Dense kernels are (n, m)
        (r".*o_proj/kernel", P("model", None)),
        (r".*(q|k|v)_proj/genlora/z_b", P("model")),    # a GenLoRA latent, (m,)
    ]

Optimizer state follows the parameters it mirrors (`state_shardings`).

Build the mesh with automatic axes, ``jax.make_mesh(shape, names,
axis_types=(jax.sharding.AxisType.Auto,) * len(names))``, so that ``jit``
places intermediates itself; under `make_mesh`'s default explicit axes, the
embedding lookup of `transformers` models has no unambiguous sharding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from genlora_jax._select import first_match
from genlora_jax._tree import is_adapter_state, path_str

Rules = Sequence[tuple[str, PartitionSpec]]
AnyMesh = Mesh | AbstractMesh


def _path(keys: Sequence[Any]) -> tuple[str, ...]:
    """A `jax.tree_util` key path as plain strings: ('layers', '0', 'q_proj', 'kernel')."""
    return tuple(jax.tree_util.keystr((k,), simple=True) for k in keys)


def _axes(entry: str | tuple[str, ...] | None) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _problem(shape: tuple[int, ...], spec: PartitionSpec, mesh: AnyMesh) -> str | None:
    """Why ``spec`` cannot split an array of ``shape`` on ``mesh``; None if it can."""
    if len(spec) > len(shape):
        return f"it names {len(spec)} axes but the leaf has {len(shape)}"
    for dim, entry in zip(shape, spec, strict=False):
        unknown = [a for a in _axes(entry) if a not in mesh.shape]
        if unknown:
            return f"the mesh has no axis {unknown[0]!r}, only {tuple(mesh.axis_names)}"
        size = math.prod(mesh.shape[a] for a in _axes(entry))
        if dim % size:
            return f"size {dim} is not divisible by the {size} devices of mesh axes {_axes(entry)}"
    return None


def _fsdp_spec(shape: tuple[int, ...], axes: tuple[str, ...], mesh: AnyMesh) -> PartitionSpec:
    """Splits the largest axis that the ``axes`` of ``mesh`` divide; else replicates."""
    size = math.prod(mesh.shape[a] for a in axes)
    fits = [i for i, d in enumerate(shape) if d % size == 0]
    if len(shape) < 2 or size == 1 or not fits:
        return PartitionSpec()
    best = max(fits, key=lambda i: shape[i])  # the first of equal sizes
    entry = axes[0] if len(axes) == 1 else axes
    return PartitionSpec(*(entry if i == best else None for i in range(len(shape))))


def partition_specs(
    params: Any, mesh: AnyMesh, rules: Rules = (), *, fsdp: str | Sequence[str] | None = None
) -> Any:
    """A `PartitionSpec` for every leaf of ``params``.

    Args:
        params: a wrapped tree, its halves from `split`, or their
            `jax.ShapeDtypeStruct` shapes (any pytree with shaped leaves).
        mesh: a `jax.sharding.Mesh`, or an `AbstractMesh` to plan without
            devices.
        rules: (pattern, spec) pairs tried in order on each leaf's path, the
            first match wins. A bare name matches the last path component
            ("kernel", "z_b"); anything else is a regex over the whole
            '/'-joined path, adapter fields included
            ("model/layers/0/self_attn/q_proj/genlora/theta_a").
        fsdp: mesh axes the default rule splits base leaves over (default:
            all of them).

    Returns:
        A tree of the structure of ``params`` with `PartitionSpec` leaves.

    Raises:
        ValueError: a rule's spec does not fit its leaf (too many axes, an
            unknown mesh axis, or a size the mesh does not divide).
    """
    axes = tuple(mesh.axis_names) if fsdp is None else _axes(fsdp)
    unknown = [a for a in axes if a not in mesh.shape]
    if unknown:
        raise ValueError(f"fsdp axis {unknown[0]!r} is not in the mesh {mesh.axis_names}.")

    def spec(keys, leaf):
        path, shape = _path(keys), tuple(leaf.shape)
        hit = first_match(rules, path)
        if hit is not None:
            pattern, rule = hit
            problem = _problem(shape, rule, mesh)
            if problem:
                raise ValueError(
                    f"rule ({pattern!r}, {rule}) does not fit {path_str(path)} {shape}: "
                    f"{problem}; change the rule or the mesh."
                )
            return rule
        if is_adapter_state(path):
            return PartitionSpec()
        return _fsdp_spec(shape, axes, mesh)

    return jax.tree_util.tree_map_with_path(spec, params)


def shardings(
    params: Any, mesh: AnyMesh, rules: Rules = (), *, fsdp: str | Sequence[str] | None = None
) -> Any:
    """A `NamedSharding` for every leaf: `partition_specs` on ``mesh``.

    Pass the result as ``in_shardings`` / ``out_shardings`` of ``jax.jit`` or
    to ``jax.device_put``.

    Example:
        >>> import jax, jax.numpy as jnp, genlora_jax as gl
        >>> mesh = jax.sharding.AbstractMesh((8,), ("fsdp",))
        >>> p = gl.wrap({"q": {"kernel": jnp.ones((64, 32))}}, ["q"], gl.LoRAConfig(rank=2))
        >>> s = gl.sharding.shardings(p, mesh)
        >>> s["q"]["kernel"].spec, s["q"]["genlora"].a.spec
        (P('fsdp', None), P())
    """
    specs = partition_specs(params, mesh, rules, fsdp=fsdp)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs)


def shard(
    params: Any, mesh: Mesh, rules: Rules = (), *, fsdp: str | Sequence[str] | None = None
) -> Any:
    """``params`` placed on ``mesh`` by `shardings` (``jax.device_put``)."""
    return jax.device_put(params, shardings(params, mesh, rules, fsdp=fsdp))


def state_shardings(state: Any, param_shardings: Any) -> Any:
    """Shardings for a tree that mirrors parameters, e.g. optimizer state.

    A leaf whose path ends with the path of a parameter (Adam's ``mu``/``nu``,
    also under `optax.multi_transform` and masks) takes that parameter's
    sharding when its shape allows; every other leaf (step counts) is
    replicated on the same mesh.

    Args:
        state: the state, or its shapes from ``jax.eval_shape(tx.init, params)``.
        param_shardings: `shardings` of the tree the state was built from.

    Returns:
        A tree of the structure of ``state`` with `NamedSharding` leaves, for
        ``jax.jit(tx.init, out_shardings=...)`` and the train step.

    Raises:
        ValueError: ``param_shardings`` holds no `NamedSharding`.
    """
    flat = jax.tree_util.tree_flatten_with_path(param_shardings)[0]
    by_path: Mapping[tuple[str, ...], NamedSharding] = {_path(k): s for k, s in flat}
    if not by_path:
        raise ValueError("param_shardings holds no NamedSharding; build it with `shardings`.")
    mesh = next(iter(by_path.values())).mesh

    def follow(keys, leaf):
        path, shape = _path(keys), tuple(leaf.shape)
        for start in range(len(path)):
            sharding = by_path.get(path[start:])
            if sharding is not None and _problem(shape, sharding.spec, mesh) is None:
                return sharding
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(follow, state)
