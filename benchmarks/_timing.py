"""Side-by-side timing: candidates run interleaved so drift hits all of them."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import jax


def interleaved_medians(
    fns: Mapping[str, Callable[[], object]], *, warmup: int = 2, repeats: int = 10
) -> dict[str, float]:
    """Median seconds per call of each thunk, timed round-robin.

    JAX arrays a thunk returns are blocked on; any other return value (a
    PyTorch step's float loss, already synchronous) is taken as ready. The
    first ``warmup`` rounds (compilation included) are discarded.
    """
    for _ in range(warmup):
        for fn in fns.values():
            jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def compile_seconds(jitted, *args) -> float:
    """Wall time of lowering and compiling ``jitted`` for ``args``."""
    start = time.perf_counter()
    jitted.lower(*args).compile()
    return time.perf_counter() - start


def report(table: str, out: str | None) -> str:
    """Prints ``table`` and, when ``out`` is given, writes it there."""
    print(table)
    if out:
        with open(out, "w") as f:
            f.write(table + "\n")
    return table
