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
    return compile_stats(jitted, *args)[0]


def compile_stats(jitted, *args) -> tuple[float, float | None]:
    """Wall time of lowering and compiling ``jitted`` for ``args``, and the
    MiB the compiled program needs by XLA's own account (arguments + outputs
    not aliased to them + temporaries; None where the backend does not say)."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    if memory is None:
        return seconds, None
    total = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )
    return seconds, total / 2**20


def report(table: str, out: str | None) -> str:
    """Prints ``table`` and, when ``out`` is given, writes it there."""
    print(table)
    if out:
        with open(out, "w") as f:
            f.write(table + "\n")
    return table
