"""Which modules and leaves a pattern selects, and which of several patterns wins.

A *pattern* is a bare module name ("q_proj"), which matches the last path
component, or a regex over the whole '/'-joined path
("model/layers/[0-3]/self_attn/(q|v)_proj", ``re.fullmatch``). Where several
patterns could apply to one path — `wrap`'s ``overrides``,
`genlora_jax.sharding`'s rules — **the first match wins** (`first_match`), the
rule PEFT's ``rank_pattern`` and t5x-style partition rules follow too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

from genlora_jax._tree import Path, flat, path_str

# GPT-2-style `Conv1D` modules store W0 itself, (m, n), not W0ᵀ.
GPT2_CONV1D = r"(.*/)?(c_attn|c_proj|c_fc|q_attn)"

_NAME = re.compile(r"[A-Za-z0-9_\-]+")
T = TypeVar("T")


def matches(pattern: str, path: Path) -> bool:
    """A bare name matches the last path component; anything else is a regex
    that must match the whole '/'-joined path (``re.fullmatch``)."""
    if _NAME.fullmatch(pattern):
        return bool(path) and path[-1] == pattern
    return re.fullmatch(pattern, path_str(path)) is not None


def _kernels(leaves: Mapping[Path, Any]) -> dict[Path, tuple[int, ...]]:
    """Module path → kernel shape, for every module holding a 'kernel'."""
    return {key[:-1]: tuple(leaf.shape) for key, leaf in leaves.items() if key[-1] == "kernel"}


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
    kernels = _kernels(flat(params))
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


def first_match(patterns: Iterable[tuple[str, T]], path: Path) -> tuple[str, T] | None:
    """The first (pattern, value) whose pattern matches ``path``, or None."""
    for pattern, value in patterns:
        if matches(pattern, path):
            return pattern, value
    return None


def is_transposed(transposed_kernels: str | None, path: Path) -> bool:
    """Whether the module at ``path`` stores W0 itself (m, n), per the regex
    ``transposed_kernels`` (`GPT2_CONV1D` by default in `wrap`)."""
    return bool(transposed_kernels) and re.fullmatch(transposed_kernels, path_str(path)) is not None


def extra_keys(leaves: Mapping[Path, Any], patterns: Iterable[str]) -> set[Path]:
    """Leaf keys that lie in (or are) a module or leaf matched by a pattern."""
    if isinstance(patterns, str):
        patterns = [patterns]
    keys: set[Path] = set()
    for pattern in patterns:
        hits = {
            key for key in leaves if any(matches(pattern, key[:i]) for i in range(1, len(key) + 1))
        }
        if not hits:
            modules = sorted({key[-2] for key in leaves if len(key) > 1})
            raise ValueError(
                f"extra_trainable pattern {pattern!r} matched no module or leaf; "
                f"module names present: {', '.join(modules)}."
            )
        keys |= hits
    return keys
