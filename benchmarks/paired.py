"""Two JAX steps in one process, timed in ABBA blocks, until a ratio is resolved.

    python -m benchmarks.paired --pairs smollm2/genlora-r8g16:smollm2/lora-r8
    python -m benchmarks.paired --pairs minilm/genlora-r8g16:minilm/lora-r8,... \\
        --resolution 0.005 --max-blocks 200 --max-minutes 20 --out BENCHMARKS.md

Why: `benchmarks.isolated` gives every candidate its own process, which is
what a torch peer needs, but the ratio of two children's medians carries the
machine's drift between them (measured: ±5–15 % per round on this 2-core
machine), so resolving 1 % that way takes dozens of rounds. Two JAX steps can
share a process: JAX runs one program at a time on the same XLA thread pool
and leaves nothing spinning after ``block_until_ready`` (torch's OpenMP pool
does, which is why torch candidates are refused here). So each pair gets one
fresh child that builds both steps (`benchmarks.isolated.build`), warms them
up, and then times blocks of four calls A, B, B, A. A block's ratio is
(A₁ + A₂) / (B₁ + B₂); a linear drift within a block cancels. Blocks run until
the 95 % t-interval of the geometric mean of the block ratios is within
``--resolution`` of it (or ``--max-blocks`` / ``--max-minutes``).

The table also gives each pair's **interference check**: every candidate's
call right after the other candidate against its call right after itself
(A₂ of a block against A₁ of the next; B₁ against B₂). A process-sharing
effect like torch's would show up there as a ratio away from 1; it is how
this method is shown equivalent to separate processes for the pair measured.

Candidates are `benchmarks.isolated.CANDIDATES`' JAX steps. ``-lean`` ones
need XLA's memory scheduler, a process-wide flag, so a pair is either both
lean or neither.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.isolated import CANDIDATES, LEAN, RATIOS, ratio_interval
from experiments.cli import positive_int

BEGIN, END = "<!-- paired:begin -->", "<!-- paired:end -->"
MIN_BLOCKS = 6
"""Blocks before the stopping rule is consulted (a t-interval of fewer is too wide to trust)."""


def jax_candidates() -> list[str]:
    """The candidates a pair may name: JAX training steps (no torch, no decoding)."""
    return [name for name, what in CANDIDATES.items() if what.startswith("jax step")]


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """``"A:B,C:D"`` → ``[(A, B), (C, D)]``, each name checked; errors name the fix."""
    allowed = jax_candidates()
    pairs = []
    for item in (p.strip() for p in text.split(",") if p.strip()):
        num, sep, den = item.partition(":")
        if not sep or not num or not den:
            raise ValueError(
                f"pair {item!r} is not NUM:DEN, e.g. smollm2/genlora-r8g16:smollm2/lora-r8."
            )
        for name in (num, den):
            if name not in allowed:
                raise ValueError(f"{name!r} is not a JAX step candidate; choose from {allowed}.")
        if bool(LEAN.search(num)) != bool(LEAN.search(den)):
            raise ValueError(
                f"pair {item!r} mixes a -lean candidate with a plain one: -lean needs XLA's "
                "memory scheduler, which is process-wide. Time such pairs with benchmarks.isolated."
            )
        pairs.append((num, den))
    if not pairs:
        raise ValueError("no pairs given; e.g. --pairs smollm2/genlora-r8g16:smollm2/lora-r8")
    return pairs


def block_ratios(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> list[float]:
    """Per ABBA block, (A₁ + A₂) / (B₁ + B₂)."""
    return [(a1 + a2) / (b1 + b2) for (a1, a2), (b1, b2) in zip(a, b, strict=True)]


def interference(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> dict[str, list]:
    """Per candidate, its call after the other one / its call after itself.

    In A B B A | A B B A | …: A₂ follows B and the next block's A₁ follows A₂;
    B₁ follows A and B₂ follows B₁.
    """
    after_a = [a2 / a1_next for (_, a2), (a1_next, _) in itertools.pairwise(a)]
    return {"num": after_a, "den": [b1 / b2 for b1, b2 in b]}


def resolved(ratios: list[float], resolution: float) -> bool:
    """True once the 95 % interval of the geometric mean is within ± ``resolution`` of it."""
    if len(ratios) < MIN_BLOCKS:
        return False
    mean, lo, hi = ratio_interval(ratios)
    return hi / mean - 1 <= resolution and 1 - lo / mean <= resolution


# ---------------------------------------------------------------- the child


def child(num: str, den: str, *, warmup: int, resolution: float, max_blocks: int, max_s: float):
    """Builds both steps in this process and times ABBA blocks; returns the raw times."""
    import jax

    from benchmarks.isolated import build

    if LEAN.search(num):
        from experiments.train import use_memory_scheduler

        use_memory_scheduler()
    (fa, ca, *ma), (fb, cb, *mb) = build(num), build(den)

    def call(fn) -> float:
        start = time.perf_counter()
        jax.block_until_ready(fn())
        return time.perf_counter() - start

    for _ in range(warmup):
        call(fa), call(fb)
    a, b = [], []
    start = time.perf_counter()
    while len(a) < max_blocks:
        a1, b1, b2, a2 = call(fa), call(fb), call(fb), call(fa)
        a.append((a1, a2))
        b.append((b1, b2))
        print(f"block {len(a)}: {(a1 + a2) / (b1 + b2):.4f}", file=sys.stderr, flush=True)
        if resolved(block_ratios(a, b), resolution) or time.perf_counter() - start > max_s:
            break
    xla_mib = [m[0] if m else None for m in (ma, mb)]
    return {"num": num, "den": den, "a": a, "b": b, "compile_s": [ca, cb], "xla_mib": xla_mib}


# ---------------------------------------------------------------- the parent


def run_pair(num: str, den: str, args) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.paired", "--child", f"{num}:{den}"]
    cmd += ["--warmup", str(args.warmup), "--resolution", str(args.resolution)]
    cmd += ["--max-blocks", str(args.max_blocks), "--max-minutes", str(args.max_minutes)]
    # the child's progress (one line per block) streams to this stderr
    done = subprocess.run(
        cmd, stdout=subprocess.PIPE, text=True, timeout=args.max_minutes * 60 + 1800
    )
    if done.returncode != 0:
        raise RuntimeError(f"pair {num}:{den} failed (its stderr is above).")
    return json.loads(done.stdout.strip().splitlines()[-1])


def target_of(num: str, den: str) -> float | None:
    """The pair's target in `benchmarks.isolated.RATIOS`, if it has one."""
    return next((t for n, d, t in RATIOS if (n, d) == (num, den)), None)


DEFAULT_PAIRS = ",".join(
    f"{model}/genlora-r{r}g16:{model}/lora-r{r}" for model in ("minilm", "smollm2") for r in (8, 64)
)
"""The issue's four ratios: GenLoRA / LoRA at r = 8 and r = 64, MiniLM and SmolLM2."""


def _fmt_interval(values: list[float]) -> str:
    mean, lo, hi = ratio_interval(values) if values else (math.nan,) * 3
    if math.isnan(lo):
        return f"{mean:.3f}"
    return f"{mean:.3f} ({lo:.3f}–{hi:.3f})"


def _xla(result: dict) -> str:
    """XLA's MiB for each step of the pair (``memory_analysis``), where known."""
    mib = result.get("xla_mib") or [None, None]
    return " / ".join("–" if m is None else f"{m:,.0f}" for m in mib)


def render(results: list[dict], *, header: str) -> str:
    """Markdown: per pair, both medians, the ratio with its interval, the target
    and the interference check."""
    lines = [
        header,
        "",
        "| A / B | blocks | median A ms | median B ms | A / B (95 % interval) | target | met "
        "| A after B / after A | B after A / after B | XLA step MiB A / B |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        num, den, a, b = res["num"], res["den"], res["a"], res["b"]
        ratios = block_ratios(a, b)
        mean, lo, hi = ratio_interval(ratios)
        target = target_of(num, den)
        if target is None:
            met = "–"
        elif hi <= target:
            met = "yes"
        elif mean <= target:
            met = "yes (interval spans the target)"
        elif lo <= target:
            met = "**no** (interval spans the target)"
        else:
            met = "**no**"
        check = interference(a, b)
        med_a = statistics.median(t for pair in a for t in pair) * 1e3
        med_b = statistics.median(t for pair in b for t in pair) * 1e3
        lines.append(
            f"| `{num}` / `{den}` | {len(ratios)} | {med_a:.0f} | {med_b:.0f} | "
            f"{_fmt_interval(ratios)} | {'–' if target is None else f'≤ {target}'} | {met} | "
            f"{_fmt_interval(check['num'])} | {_fmt_interval(check['den'])} | {_xla(res)} |"
        )
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default=DEFAULT_PAIRS, help="NUM:DEN,… (default: %(default)s)")
    parser.add_argument("--resolution", type=float, default=0.005, help="relative half-width")
    parser.add_argument("--max-blocks", type=positive_int, default=200)
    parser.add_argument("--max-minutes", type=float, default=20.0, help="per pair")
    parser.add_argument("--warmup", type=positive_int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--raw", type=Path, default=None, help="also write the raw times (JSON)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        pairs = parse_pairs(args.child or args.pairs)
    except ValueError as err:
        parser.error(str(err))
    if args.child:
        ((num, den),) = pairs
        result = child(
            num,
            den,
            warmup=args.warmup,
            resolution=args.resolution,
            max_blocks=args.max_blocks,
            max_s=args.max_minutes * 60,
        )
        print(json.dumps(result))
        return ""
    results = []
    for num, den in pairs:
        results.append(run_pair(num, den, args))
        print(f"{num} / {den}: done", file=sys.stderr, flush=True)
        if args.raw:
            args.raw.write_text(json.dumps(results))
    from benchmarks.suite import publish

    setup = (
        f"each pair in one fresh process, {args.warmup} warm-up calls each, then ABBA blocks "
        f"until the 95 % interval is within ±{args.resolution:.1%} "
        f"(at most {args.max_blocks} blocks or {args.max_minutes:g} min)"
    )
    table = lambda header: render(results, header=header)
    return publish("benchmarks.paired", argv, setup, table, args.out, begin=BEGIN, end=END)


if __name__ == "__main__":
    main()
