"""Benchmark suite of issue 6: every method and the PyTorch peer, side by side.

    python -m benchmarks.suite --out BENCHMARKS.md [--repeats 10] [--methods NAMES] [--quick]

Real MiniLM-L6 (BERT), batch 32 × 64 random tokens, targets query/key/value,
classifier head trained too. Candidates, timed round-robin in one process
(medians after warm-up, compilation excluded):

- a jitted AdamW step differentiating only the adapter half of the tree for
  genlora_jax LoRA r=8 (the reference), GenLoRA r=8/32/64 and each baseline;
- the peer: PEFT LoRA r=8 on the same checkpoint and token ids in PyTorch
  (CPU, all cores, OpenMP waiting passively, eval mode so neither side runs
  dropout; forward, backward, AdamW step, zero_grad);
- the base model's jitted forward and the same forward on merged GenLoRA r=8
  weights.

Also reported: compile seconds per JAX candidate, and the peak RSS of a child
process that runs only that candidate (load, compile, 5 calls); ``--no-rss``
skips the children. ``--quick`` (CI smoke): batch 4 × 16, 2 repeats, 1
warm-up round. ``--methods`` takes comma-separated method names (default all;
see ``METHODS``). If ``--out`` exists and holds the ``<!-- suite:begin -->`` /
``<!-- suite:end -->`` markers, only the text between them is replaced, so
prose around the table survives a re-run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import re
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import optax

import genlora_jax as gl
from benchmarks import methods
from benchmarks._timing import compile_seconds, interleaved_medians
from benchmarks.core import TARGETS, load_model, make_batch, timed_step
from experiments.cli import count, positive_int
from experiments.models import minilm_path

# Set before torch is imported. On shared cores OpenMP's default spin-wait more
# than doubled the peer's step (6.2 s against 2.4 s at batch 32 × 64 here).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REFERENCE = "LoRA r=8"
GENLORA = "GenLoRA r=8 G=16"
METHODS = {
    **methods.METHODS,
    "GenLoRA r=32 G=16": methods.method_config("genlora-r32g16"),
    "GenLoRA r=64 G=16": methods.method_config("genlora-r64g16"),
}
PEER = "PEFT LoRA r=8 (torch)"
BASE = "base forward"
MERGED = "merged forward (GenLoRA r=8)"
GOALS = [
    ("GenLoRA r=8 step / PEFT LoRA r=8 step (torch)", GENLORA, PEER, 0.85),
    ("GenLoRA r=64 step / genlora_jax LoRA r=8 step", "GenLoRA r=64 G=16", REFERENCE, 1.05),
    ("merged forward / base forward", MERGED, BASE, 1.01),
]
BEGIN, END = "<!-- suite:begin -->", "<!-- suite:end -->"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Candidate:
    """One timed thunk, with its compile seconds and trainable count if known."""

    thunk: Callable[[], object]
    compile_s: float | None = None
    trainable: int | None = None


def peer_unavailable() -> str | None:
    """Why the PyTorch peer cannot run here, or None when it can."""
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
    except ImportError as err:
        return f"torch/peft not importable ({err}); install with `make install-test`"
    return None


def method_candidate(model, name: str, batch) -> Candidate:
    """The jitted adapter-only AdamW step of ``METHODS[name]``."""
    params = gl.wrap(model.params, TARGETS, METHODS[name], extra_trainable=["classifier"])
    thunk, compile_s = timed_step(model, params, batch, gl.optimizer(optax.adamw(1e-3)))
    return Candidate(thunk=thunk, compile_s=compile_s, trainable=gl.count_params(params).trainable)


def forward_candidate(model, name: str, batch) -> Candidate:
    """The jitted forward on the base weights, or on merged GenLoRA r=8 ones."""
    params = model.params
    if name == MERGED:
        params = gl.merge(gl.wrap(params, TARGETS, METHODS[GENLORA], rng=jax.random.key(1)))
    forward = jax.jit(lambda p, ids, mask: model(ids, mask, params=p).logits)
    args = (params, batch["input_ids"], batch["attention_mask"])
    return Candidate(thunk=lambda: forward(*args), compile_s=compile_seconds(forward, *args))


def peer_candidate(batch) -> Candidate:
    """PEFT LoRA r=8 on q/k/v (+ classifier) of the same checkpoint and batch."""
    import peft
    import torch
    from transformers import BertForSequenceClassification

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    config = peft.LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["query", "key", "value"],
        lora_dropout=0.0,
        modules_to_save=["classifier"],
    )
    model = peft.get_peft_model(model, config).eval()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    ids, mask, labels = (
        torch.from_numpy(np.asarray(batch[k], np.int64))
        for k in ("input_ids", "attention_mask", "labels")
    )

    def step() -> float:
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.item()

    return Candidate(thunk=step, trainable=sum(p.numel() for p in trainable))


def build(names: list[str], batch) -> dict[str, Candidate]:
    """Candidates by name: method names, ``PEER``, ``BASE``, ``MERGED``."""
    model = load_model() if set(names) - {PEER} else None
    out = {}
    for name in names:
        if name == PEER:
            out[name] = peer_candidate(batch)
        elif name in (BASE, MERGED):
            out[name] = forward_candidate(model, name, batch)
        else:
            out[name] = method_candidate(model, name, batch)
    return out


def peak_rss_mib(name: str, batch: int, seq: int) -> float:
    """Peak RSS of a child process that builds ``name`` alone and calls it 5 times."""
    cmd = [sys.executable, "-m", "benchmarks.suite", "--rss-child", name]
    cmd += ["--batch", str(batch), "--seq", str(seq)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return int(re.search(r"^peak_rss_kib (\d+)$", out, re.M).group(1)) / 1024


def _rss_child(name: str, batch: int, seq: int) -> None:
    fn = build([name], make_batch(batch, seq))[name].thunk
    for _ in range(5):
        jax.block_until_ready(fn())
    # VmHWM restarts at exec; ru_maxrss would keep the forking parent's peak.
    status = Path("/proc/self/status")
    found = re.search(r"^VmHWM:\s*(\d+) kB$", status.read_text(), re.M) if status.exists() else None
    kib = int(found.group(1)) if found else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"peak_rss_kib {kib}")


def measure(
    names: list[str], *, batch: int, seq: int, repeats: int, warmup: int, rss: bool
) -> dict[str, dict]:
    """Median seconds, compile seconds, trainable count and peak RSS per candidate."""
    candidates = build(names, make_batch(batch, seq))
    medians = interleaved_medians(
        {k: c.thunk for k, c in candidates.items()}, warmup=warmup, repeats=repeats
    )
    return {
        name: {
            "median_s": medians[name],
            "compile_s": c.compile_s,
            "trainable": c.trainable,
            "rss_mib": peak_rss_mib(name, batch, seq) if rss else None,
        }
        for name, c in candidates.items()
    }


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def render(results: dict[str, dict], *, header: str) -> str:
    """Markdown: the per-candidate table, then the target ratios that were measured."""
    ref = results.get(REFERENCE, {}).get("median_s")
    peer = results.get(PEER, {}).get("median_s")
    lines = [
        header,
        "",
        "| candidate | trainable | median ms | vs LoRA r=8 | vs PEFT LoRA | compile s "
        "| peak RSS MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        sec = r["median_s"]
        step = name not in (BASE, MERGED)
        lines.append(
            f"| {name} | {_fmt(r['trainable'], ',')} | {1000 * sec:.1f} "
            f"| {_fmt(sec / ref if ref and step else None, '.3f')} "
            f"| {_fmt(sec / peer if peer and step else None, '.3f')} "
            f"| {_fmt(r['compile_s'], '.1f')} | {_fmt(r['rss_mib'], '.0f')} |"
        )
    lines += ["", "| ratio | measured | target | met |", "| --- | ---: | ---: | --- |"]
    for label, num, den, target in GOALS:
        if num in results and den in results:
            ratio = results[num]["median_s"] / results[den]["median_s"]
            met = "yes" if ratio <= target else "**no**"
            lines.append(f"| {label} | {ratio:.3f} | ≤ {target} | {met} |")
    return "\n".join(lines)


def machine() -> str:
    """CPU model, core count, and the jax / torch versions and devices."""
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = found.group(1) if found else cpu
    torch_version = "not installed"
    if peer_unavailable() is None:
        import torch

        torch_version = f"{torch.__version__} ({torch.get_num_threads()} threads)"
    return (
        f"{cpu}, {os.cpu_count()} cores; jax {jax.__version__} on "
        f"{jax.devices()[0].platform}; torch {torch_version}"
    )


def run_header(module: str, argv, setup: str, notes: list[str] = ()) -> str:
    """The lines above a benchmark table: the command as typed, the machine, the
    date (UTC) and the setup, then any ``notes``."""
    command = " ".join([f"python -m {module}", *(argv if argv is not None else sys.argv[1:])])
    return "\n".join(
        [
            f"- command: `{command}`",
            f"- machine: {machine()}",
            f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
            f"- setup: {setup}",
            *notes,
        ]
    )


def publish(module: str, argv, setup: str, render, out: Path | None, *, begin: str, end: str):
    """``render(header)`` under `run_header`'s lines: printed, written between
    ``begin`` and ``end`` in ``out`` when given (`write`), and returned."""
    table = render(run_header(module, argv, setup))
    print(table)
    if out:
        write(out, table, begin=begin, end=end)
    return table


def write(path: Path, table: str, *, begin: str = BEGIN, end: str = END) -> None:
    """Replaces the block between ``begin`` and ``end`` in ``path`` with ``table``;
    appends the marked block when the file has none (creates the file if needed)."""
    block = f"{begin}\n{table}\n{end}"
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        block = head + block + rest.split(end, 1)[1]
    elif text:
        block = text.rstrip("\n") + "\n\n" + block
    path.write_text(block if block.endswith("\n") else block + "\n")


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=positive_int, default=10)
    parser.add_argument("--warmup", type=count, default=2)
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--seq", type=positive_int, default=64)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
    parser.add_argument("--quick", action="store_true", help="batch 4 x 16, 2 repeats")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS children")
    parser.add_argument("--no-peer", action="store_true", help="skip the PyTorch peer")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.repeats, args.warmup = 4, 16, 2, 1
    if args.rss_child:
        _rss_child(args.rss_child, args.batch, args.seq)
        return ""
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        parser.error(f"unknown --methods {unknown}; choose from {list(METHODS)}")
    skipped = "--no-peer" if args.no_peer else peer_unavailable()
    names += [BASE, MERGED] + ([] if skipped else [PEER])

    results = measure(
        names,
        batch=args.batch,
        seq=args.seq,
        repeats=args.repeats,
        warmup=args.warmup,
        rss=not args.no_rss,
    )
    header = run_header(
        "benchmarks.suite",
        argv,
        f"MiniLM-L6, batch {args.batch} × {args.seq}, q/k/v + classifier; "
        f"median of {args.repeats} interleaved repeats after {args.warmup} warm-up "
        "round(s); peak RSS per candidate in its own child process"
        + (" (skipped)" if args.no_rss else ""),
        [f"- PyTorch peer skipped: {skipped}"] if skipped else [],
    )
    table = render(results, header=header)
    print(table)
    if args.out:
        write(args.out, table)
    return table


if __name__ == "__main__":
    main()
