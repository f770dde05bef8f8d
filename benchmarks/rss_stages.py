"""Where a SmolLM2 training process's resident memory goes, stage by stage.

    python -m benchmarks.rss_stages [--candidates A,B] [--out FILE]

`benchmarks.isolated` reports each candidate's peak RSS over its calls and
that peak less the import floor; this script splits the rest. Each candidate
(a name of `benchmarks.isolated.CANDIDATES`, SmolLM2 training steps only)
runs in its own child, which builds the step of `benchmarks.isolated` one
stage at a time and reads /proc/self/status after each, with freed heap
handed back first (``gc.collect`` and glibc's ``malloc_trim``):

1. imports: Python, JAX (backend up), Flax, transformers, tokenizers;
2. load: `genlora_jax.models.load_gguf` (float base, or Q4_1/Q8_0 kept);
3. adapters: `gl.wrap`, the split, the optimizer state, the batch;
4. lowered: ``step.lower(...)`` (traced, StableHLO built);
5. compiled: ``.compile()``, the lowering dropped;
6. caches cleared: `jax.clear_caches()` with the compiled step kept;
7. calls: the peak of two calls of the compiled step (VmHWM restarted).

RSS is split into anonymous memory (arrays, heaps) and file-backed pages
(mostly the shared libraries' code: XLA's compiler lives in jaxlib, and
compiling pages it in).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from benchmarks._timing import report
from benchmarks.isolated import (
    _release_freed,
    _reset_peak,
    _status_mib,
    smollm2_step_options,
)
from experiments.cli import markdown_table

DEFAULT = ("smollm2/genlora-r8g16", "smollm2/genlora-r8g16-q4-lean")
STAGES = ["imports", "load", "adapters", "lowered", "compiled", "caches cleared", "calls"]


def _sample() -> dict:
    import gc

    gc.collect()
    _release_freed()
    return {
        "rss": _status_mib("VmRSS"),
        "anon": _status_mib("RssAnon"),
        "file": _status_mib("RssFile"),
    }


def child(name: str) -> list[dict]:
    """The stages of candidate ``name``: MiB resident after each, and seconds."""
    method = name.split("/", 1)[1]
    method, _, base_format, lean, _ = smollm2_step_options(method)
    if lean is not False:
        from experiments.train import use_memory_scheduler

        use_memory_scheduler()

    import jax
    import jax.numpy as jnp
    import optax

    import genlora_jax as gl
    from benchmarks.isolated import _smollm2_batch
    from benchmarks.methods import method_config
    from experiments.finetune import causal_lm_loss, lean_causal_lm_loss
    from experiments.train import make_step
    from genlora_jax.models import load_gguf

    jax.devices()
    rows = []
    clock = time.perf_counter()

    def stage(label: str, **extra) -> None:
        nonlocal clock
        rows.append({"stage": label, **_sample(), "seconds": time.perf_counter() - clock, **extra})
        clock = time.perf_counter()

    stage("imports")
    model, base, _ = load_gguf("smollm2", quantized=base_format == "q4", remat=lean)
    if base_format == "nf4":
        base = gl.quant.quantize_base(base)
    stage("load", arrays=sum(x.nbytes for x in jax.tree.leaves(base)) / 2**20)
    base, adapters = gl.split(gl.wrap(base, ["q_proj", "k_proj", "v_proj"], method_config(method)))
    tx = gl.optimizer(optax.adamw(1e-4))
    state = tx.init(adapters)
    ids, mask = (jnp.asarray(x) for x in _smollm2_batch())
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids, "loss_mask": mask}
    stage("adapters")
    loss = lean_causal_lm_loss(model) if lean is not False else causal_lm_loss(model)
    step = make_step(loss, tx)
    lowered = step.lower(adapters, state, base, batch, None)
    stage("lowered")
    compiled = lowered.compile()
    del lowered
    temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
    stage("compiled", xla_temp=temp)
    jax.clear_caches()
    stage("caches cleared")
    _reset_peak()
    for _ in range(2):
        jax.block_until_ready(compiled(adapters, state, base, batch, None))
    rows.append({"stage": "calls", **_sample(), "peak": _status_mib("VmHWM")})
    rows[-1]["seconds"] = time.perf_counter() - clock
    return rows


def run_child(name: str, timeout: int = 1800) -> list[dict]:
    import os

    cmd = [sys.executable, "-m", "benchmarks.rss_stages", "--child", name]
    env = dict(os.environ, USE_TORCH="0")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"candidate {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def render(results: dict[str, list[dict]], command: str) -> str:
    """Markdown: per stage, each candidate's RSS and what the stage added
    (anonymous + file-backed), and the calls' peak."""
    names = list(results)
    header = ["stage"]
    for name in names:
        short = name.split("/", 1)[1]
        header += [f"{short} RSS", f"{short} added (anon + file)"]
    table = []
    for i, label in enumerate(STAGES):
        line = [label]
        for name in names:
            row, before = results[name][i], results[name][i - 1] if i else None
            if label == "calls":
                line += [f"peak {row['peak']:,.0f}", f"+{row['peak'] - before['rss']:,.0f}"]
                continue
            line.append(f"{row['rss']:,.0f}")
            if before is None:
                line.append(f"{row['anon']:,.0f} + {row['file']:,.0f}")
            else:
                anon, file = row["anon"] - before["anon"], row["file"] - before["file"]
                line.append(f"{anon:+,.0f} {file:+,.0f}")
        table.append(line)
    peaks = {name: results[name][-1]["peak"] for name in names}
    lines = [f"- command: `{command}`", ""]
    lines += [markdown_table(header, "l" + "rr" * len(names), table), ""]
    first = names[0]
    above = {name: peaks[name] - results[name][0]["rss"] for name in names}
    for name in names[1:]:
        lines.append(
            f"- calls' peak, {name} / {first}: {peaks[name] / peaks[first]:.3f}; "
            f"without the import floor: {above[name] / above[first]:.3f}"
        )
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", default=",".join(DEFAULT), help="comma-separated")
    parser.add_argument("--out", default=None, help="also write the table here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child)), flush=True)
        return ""
    from benchmarks.isolated import CANDIDATES, uses_torch

    names = args.candidates.split(",")
    steps = [n for n in CANDIDATES if n.startswith("smollm2/") and not uses_torch(n)]
    # the child builds the plain step: no decoding, pregenerated factors or donation
    steps = [n for n in steps if not any(k in n for k in ("decode", "batched", "donate"))]
    wrong = [n for n in names if n not in steps]
    if wrong:
        parser.error(f"--candidates {wrong}: not a SmolLM2 JAX training step; choose from {steps}")
    results = {}
    for name in names:
        results[name] = run_child(name)
        print(f"{name}: calls' peak {results[name][-1]['peak']:,.0f} MiB", file=sys.stderr)
    command = "python -m benchmarks.rss_stages" + "".join(
        f" {flag} {value}"
        for flag, value in (("--candidates", args.candidates), ("--out", args.out))
        if value and (flag != "--candidates" or value != ",".join(DEFAULT))
    )
    return report(render(results, command), args.out)


if __name__ == "__main__":
    main()
