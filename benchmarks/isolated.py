"""Every candidate in its own process, rounds alternating (issue 15).

    python -m benchmarks.isolated [--rounds 5] [--steps 12] [--out BENCHMARKS.md]
    python -m benchmarks.isolated --candidates smollm2/lora-r8,smollm2/genlora-r8g16

Why processes: torch's thread pool slows whatever JAX step runs next in the
same process (measured up to 1.5× on SmolLM2), so timing PEFT beside the JAX
steps in one process mixes that into every ratio. Here each round starts one
fresh child per candidate, in alternating order (forward, then reversed); a
child loads its model, compiles (timed), runs ``--warmup`` calls and then
``--steps`` timed calls, and reports the median call, the compile seconds and
its peak RSS (VmHWM). A ratio A/B is computed per round from the two medians
and summarised as the geometric mean over rounds with a 95 % t-interval, so
the table says how well each ratio is resolved.

Memory is given three ways: XLA's own account of the compiled step, the
child's peak RSS, and that peak less the child's **import floor** (VmRSS once
Python, JAX, Flax, transformers and tokenizers are loaded, before any model),
the part a training step and its model add. JAX children start with
``USE_TORCH=0``, so that transformers does not import torch (about 300 MiB
here) into a process that never calls it.

To resolve a ratio of two JAX steps to 1 %, time them in one process with
`benchmarks.paired` (ABBA blocks); separate processes carry the machine's
drift between them.

Candidates (``CANDIDATES``):

- ``smollm2/*``: SmolLM2-135M-Instruct from its GGUF file, dequantized to
  float32, batch 8 × 128 random tokens, next-token loss, q/k/v adapted, a
  jitted AdamW step over the adapter half only: `experiments.train.make_step`,
  the training loop's step, with GenLoRA's factors generated inside each
  module call as training does. ``-batched`` generates them all before the
  call (`gl.pregenerate`, ``batch_generators=True``); ``-donate`` donates the
  adapters and optimizer state (``make_step(donate=True)``); ``peft-lora-r8``
  is PEFT in torch on the same GGUF (transformers' torch GGUF loader), eval
  mode, AdamW.
- ``smollm2/genlora-r8g16-q4`` / ``-nf4``: the same GenLoRA step on a base
  kept in the file's Q4_1/Q8_0 blocks, or re-quantized to NF4
  (`genlora_jax.quant`), dequantized inside the step.
- ``smollm2/*-lean``: the same step on `genlora_jax.models.remat_llama`
  (every decoder layer recomputed in the backward pass) with the loss taken
  6,144 words of the vocabulary at a time
  (``experiments.finetune.lean_causal_lm_loss``), so the (B, L, V) logits
  never exist at once. ``-leanN`` recomputes only the
  first N of the 30 layers (``load_gguf(remat=N)``, ``--remat-layers N``).
- ``minilm/*``: MiniLM-L6 (BERT) with a two-label head, batch 32 × 64, the
  steps of `benchmarks.suite` (classifier trained too), PEFT as its peer.
- ``smollm2/decode-*``: greedy KV-cached decoding of 8 prompts × 32 new
  tokens (EOS ignored, so every row decodes 32), tokens per second: the
  jitted Flax ``generate`` against torch ``generate``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Before torch is imported (see benchmarks.suite).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from experiments.cli import count, positive_int

STEP_BATCH = {"smollm2": (8, 128), "minilm": (32, 64)}
DECODE_PROMPTS, DECODE_PROMPT_LEN, DECODE_NEW = 8, 64, 32
CANDIDATES = {
    "smollm2/lora-r8": "jax step, LoRA r=8",
    "smollm2/genlora-r8g16": "jax step, GenLoRA r=8 G=16",
    "smollm2/genlora-r8g16-batched": "jax step, GenLoRA r=8 G=16, batched generators "
    "(gl.pregenerate)",
    "smollm2/genlora-r64g16": "jax step, GenLoRA r=64 G=16",
    "smollm2/genlora-r64g16-batched": "jax step, GenLoRA r=64 G=16, batched generators "
    "(gl.pregenerate)",
    "smollm2/lora-r64": "jax step, LoRA r=64",
    "smollm2/genlora-r8g16-donate": "jax step, GenLoRA r=8 G=16, adapters and optimizer "
    "state donated (donate_argnums)",
    "smollm2/genlora-r8g16-q4": "jax step, GenLoRA r=8 G=16, base kept in its Q4_1/Q8_0 blocks",
    "smollm2/genlora-r8g16-nf4": "jax step, GenLoRA r=8 G=16, base in NF4",
    "smollm2/genlora-r8g16-lean": "jax step, GenLoRA r=8 G=16, layers rematerialised, "
    "loss by vocabulary slices",
    "smollm2/genlora-r8g16-q4-lean": "jax step, GenLoRA r=8 G=16, Q4_1/Q8_0 base, layers "
    "rematerialised, loss by vocabulary slices",
    "smollm2/genlora-r8g16-q4-lean24": "jax step, GenLoRA r=8 G=16, Q4_1/Q8_0 base, the first "
    "24 of 30 layers rematerialised, loss by vocabulary slices",
    "smollm2/genlora-r8g16-q4-lean20": "jax step, GenLoRA r=8 G=16, Q4_1/Q8_0 base, the first "
    "20 of 30 layers rematerialised, loss by vocabulary slices",
    "smollm2/peft-lora-r8": "torch step, PEFT LoRA r=8",
    "smollm2/decode-jax": "jax greedy decode, tokens/s",
    "smollm2/decode-torch": "torch greedy decode, tokens/s",
    "minilm/lora-r8": "jax step, LoRA r=8",
    "minilm/genlora-r8g16": "jax step, GenLoRA r=8 G=16",
    "minilm/genlora-r64g16": "jax step, GenLoRA r=64 G=16",
    "minilm/lora-r64": "jax step, LoRA r=64",
    "minilm/peft-lora-r8": "torch step, PEFT LoRA r=8",
}
# (numerator, denominator, target or None): the ratios of step time reported.
RATIOS = [
    ("smollm2/genlora-r8g16", "smollm2/lora-r8", 1.01),
    ("smollm2/genlora-r64g16", "smollm2/lora-r64", 1.03),
    ("smollm2/genlora-r64g16", "smollm2/lora-r8", None),
    ("smollm2/genlora-r8g16-batched", "smollm2/genlora-r8g16", None),
    ("smollm2/genlora-r64g16-batched", "smollm2/genlora-r64g16", None),
    ("smollm2/genlora-r8g16-donate", "smollm2/genlora-r8g16", None),
    ("smollm2/lora-r8", "smollm2/peft-lora-r8", None),
    ("smollm2/genlora-r8g16", "smollm2/peft-lora-r8", None),
    ("smollm2/decode-jax", "smollm2/decode-torch", None),
    ("smollm2/genlora-r8g16-q4", "smollm2/genlora-r8g16", 1.3),
    ("smollm2/genlora-r8g16-nf4", "smollm2/genlora-r8g16", 1.3),
    ("smollm2/genlora-r8g16-lean", "smollm2/genlora-r8g16", None),
    ("smollm2/genlora-r8g16-q4-lean", "smollm2/genlora-r8g16", 1.3),
    ("smollm2/genlora-r8g16-q4-lean24", "smollm2/genlora-r8g16", 1.3),
    ("smollm2/genlora-r8g16-q4-lean20", "smollm2/genlora-r8g16", 1.3),
    ("minilm/genlora-r8g16", "minilm/lora-r8", 1.01),
    ("minilm/genlora-r64g16", "minilm/lora-r64", 1.03),
    ("minilm/genlora-r64g16", "minilm/lora-r8", None),
    ("minilm/lora-r8", "minilm/peft-lora-r8", None),
    ("minilm/genlora-r8g16", "minilm/peft-lora-r8", None),
]
# (numerator, denominator, target): ratios of memory, both XLA's account of the
# step (arguments + outputs + temporaries) and the child's peak RSS.
RSS_RATIOS = [
    ("smollm2/genlora-r8g16-q4", "smollm2/genlora-r8g16", 0.45),
    ("smollm2/genlora-r8g16-nf4", "smollm2/genlora-r8g16", 0.45),
    ("smollm2/genlora-r8g16-lean", "smollm2/genlora-r8g16", None),
    ("smollm2/genlora-r8g16-q4-lean", "smollm2/genlora-r8g16", 0.45),
    ("smollm2/genlora-r8g16-q4-lean24", "smollm2/genlora-r8g16", 0.45),
    ("smollm2/genlora-r8g16-q4-lean20", "smollm2/genlora-r8g16", 0.45),
    ("smollm2/genlora-r8g16-q4-lean", "smollm2/genlora-r8g16-lean", None),
    ("smollm2/genlora-r8g16-donate", "smollm2/genlora-r8g16", None),
]
LEAN = re.compile(r"-lean(\d*)$")
BEGIN, END = "<!-- isolated:begin -->", "<!-- isolated:end -->"
# t quantiles (0.975) for 1..30 degrees of freedom, for the ratio intervals.
_T975 = [12.71, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]
_T975 += [2.201, 2.179, 2.16, 2.145, 2.131, 2.12, 2.11, 2.101, 2.093, 2.086]
_T975 += [2.08, 2.074, 2.069, 2.064, 2.06, 2.056, 2.052, 2.048, 2.045, 2.042]


# ---------------------------------------------------------------- the children


def _status_mib(field: str) -> float:
    """``field`` of /proc/self/status (VmRSS, VmHWM) in MiB; nan where there is none."""
    status = Path("/proc/self/status")
    if not status.exists():
        return math.nan
    found = re.search(rf"^{field}:\s*(\d+) kB$", status.read_text(), re.M)
    return int(found.group(1)) / 1024 if found else math.nan


def _peak_rss_mib() -> float:
    peak = _status_mib("VmHWM")
    if not math.isnan(peak):
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mib() -> float:
    """The current resident set (VmRSS), MiB; nan where /proc is missing."""
    return _status_mib("VmRSS")


def _import_floor_mib() -> float:
    """VmRSS once the modules every candidate's ``build`` imports are loaded and
    JAX's backend is up, before any model: the process floor that no training
    step can shrink (Python, JAX, Flax, transformers, tokenizers)."""
    import jax

    import benchmarks.core  # noqa: F401 (transformers' Flax BERT)
    import experiments.finetune  # noqa: F401
    import genlora_jax.models  # noqa: F401 (transformers' Flax Llama)

    jax.devices()
    _release_freed()
    return _rss_mib()


def uses_torch(name: str) -> bool:
    """Whether candidate ``name`` runs in PyTorch (the others start with USE_TORCH=0)."""
    return "peft" in name or name.endswith("-torch")


def _timed(fn, warmup: int, steps: int) -> list[float]:
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


def _smollm2_batch():
    import numpy as np

    batch, seq = STEP_BATCH["smollm2"]
    ids = np.random.default_rng(0).integers(100, 40000, (batch, seq))
    return ids.astype(np.int32), np.ones((batch, seq), np.int32)


def _smollm2_jax_step(
    method: str,
    batch_generators: bool,
    base_format: str = "float",
    lean: bool | int = False,
    donate: bool = False,
):
    import jax.numpy as jnp
    import optax

    import genlora_jax as gl
    from benchmarks._timing import compile_stats
    from benchmarks.methods import method_config
    from experiments.finetune import causal_lm_loss, lean_causal_lm_loss
    from experiments.train import make_step
    from genlora_jax.models import load_gguf

    model, base, _ = load_gguf(
        "smollm2", dtype=jnp.float32, quantized=base_format == "q4", remat=lean
    )
    if base_format == "nf4":
        base = gl.quant.quantize_base(base)
    params = gl.wrap(base, ["q_proj", "k_proj", "v_proj"], method_config(method))
    base, adapters = gl.split(params)
    tx = gl.optimizer(optax.adamw(1e-4))
    ids, mask = (jnp.asarray(x) for x in _smollm2_batch())
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids, "loss_mask": mask}
    lm_loss = lean_causal_lm_loss(model) if lean is not False else causal_lm_loss(model)

    def loss_fn(params, batch, rng):
        return lm_loss(gl.pregenerate(params) if batch_generators else params, batch, rng)

    # the training loop's step: the base is an argument (a closed-over base
    # would be compiled into the program as constants, a second copy of it)
    step = make_step(loss_fn, tx, donate=donate)
    state = tx.init(adapters)
    compile_s, step_mib = compile_stats(step, adapters, state, base, batch, None)
    if not donate:
        return (lambda: step(adapters, state, base, batch, None)), compile_s, step_mib
    carry = [adapters, state]  # donated arrays are deleted: each call feeds the last outputs back

    def donated_call():
        carry[0], carry[1], loss, _ = step(*carry, base, batch, None)
        return loss

    return donated_call, compile_s, step_mib


def _smollm2_torch():
    import torch
    from transformers import AutoModelForCausalLM

    from genlora_jax.models import smollm2_path

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    folder, name = os.path.split(str(smollm2_path()))
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)


def _smollm2_peft_step():
    import peft
    import torch

    model = peft.get_peft_model(
        _smollm2_torch(),
        peft.LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj"], lora_dropout=0.0
        ),
    ).eval()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids, mask = (torch.from_numpy(x.astype("int64")) for x in _smollm2_batch())

    def step() -> float:
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.item()

    return step, None


def _decode_prompts():
    import numpy as np

    rng = np.random.default_rng(1)
    ids = rng.integers(100, 40000, (DECODE_PROMPTS, DECODE_PROMPT_LEN))
    return ids.astype(np.int32), np.ones_like(ids, np.int32)


def _decode_jax():
    import jax
    import jax.numpy as jnp
    from transformers import GenerationConfig

    from benchmarks._timing import compile_seconds
    from genlora_jax.models import load_gguf

    model, params, _ = load_gguf("smollm2", dtype=jnp.float32)
    config = GenerationConfig(
        do_sample=False, max_new_tokens=DECODE_NEW, pad_token_id=2, eos_token_id=None
    )
    ids, mask = (jnp.asarray(x) for x in _decode_prompts())
    decode = jax.jit(
        lambda p, i, m: model.generate(i, generation_config=config, attention_mask=m, params=p)
    )
    compile_s = compile_seconds(decode, params, ids, mask)
    return (lambda: decode(params, ids, mask).sequences), compile_s


def _decode_torch():
    import torch

    model = _smollm2_torch().eval()
    ids, mask = (torch.from_numpy(x.astype("int64")) for x in _decode_prompts())

    def decode():
        with torch.no_grad():
            return model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=DECODE_NEW,
                min_new_tokens=DECODE_NEW,
                do_sample=False,
                pad_token_id=2,
            )

    return decode, None


def _minilm_step(method: str):
    import optax

    import genlora_jax as gl
    from benchmarks import core, methods

    model = core.load_model()
    params = gl.wrap(
        model.params, core.TARGETS, methods.method_config(method), extra_trainable=["classifier"]
    )
    batch = core.make_batch(*STEP_BATCH["minilm"])
    return core.timed_step(model, params, batch, gl.optimizer(optax.adamw(1e-3)))


def _minilm_peft_step():
    from benchmarks import core, suite

    return suite.peer_candidate(core.make_batch(*STEP_BATCH["minilm"])).thunk, None


def build(name: str):
    """``(thunk, compile seconds or None)`` of candidate ``name``, in this process."""
    model, method = name.split("/", 1)
    if name == "smollm2/peft-lora-r8":
        return _smollm2_peft_step()
    if name == "smollm2/decode-jax":
        return _decode_jax()
    if name == "smollm2/decode-torch":
        return _decode_torch()
    if name == "minilm/peft-lora-r8":
        return _minilm_peft_step()
    if model == "smollm2":
        return _smollm2_jax_step(*smollm2_step_options(method))
    return _minilm_step(method)


def smollm2_step_options(method: str) -> tuple[str, bool, str, bool | int, bool]:
    """A SmolLM2 step candidate's method part (``genlora-r8g16-q4-lean24``) as
    ``(method, batched, base format, lean, donate)`` for `_smollm2_jax_step`:
    ``-lean`` recomputes every layer (True), ``-leanN`` the first N."""
    found = LEAN.search(method)
    lean = False if found is None else int(found.group(1)) if found.group(1) else True
    method = LEAN.sub("", method)
    donate = method.endswith("-donate")
    method = method.removesuffix("-donate")
    batched = method.endswith("-batched")
    base_format = next((f for f in ("q4", "nf4") if method.endswith(f"-{f}")), "float")
    method = method.removesuffix("-batched").removesuffix(f"-{base_format}")
    return method, batched, base_format, lean, donate


def _release_freed() -> None:
    """Hands memory that loading and compiling freed back to the kernel (glibc's
    ``malloc_trim``), so the peak RSS that follows is the calls', not the heap's."""
    import contextlib
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak() -> bool:
    """Restarts the kernel's peak-RSS count (VmHWM), so that it covers what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def child(name: str, warmup: int, steps: int) -> dict:
    """Runs candidate ``name`` and returns its measurements (a JSON object).

    The peak RSS covers the calls only (and the arrays they keep), not the
    loading and compiling before them, where the kernel lets the count restart.
    """
    if LEAN.search(name):
        from experiments.train import use_memory_scheduler

        use_memory_scheduler()
    floor = _import_floor_mib()
    thunk, compile_s, *step_mib = build(name)
    _release_freed()
    built = _rss_mib()  # the model, its arrays and the compiled program, before a call
    step_only = _reset_peak()
    times = _timed(thunk, warmup, steps)
    row = {"name": name, "compile_s": compile_s, "median_s": statistics.median(times)}
    row["xla_mib"] = step_mib[0] if step_mib else None
    if "decode" in name:
        row["tokens_per_s"] = DECODE_PROMPTS * DECODE_NEW / row["median_s"]
    row["peak_rss_mib"] = _peak_rss_mib()
    row["floor_rss_mib"] = floor
    row["built_rss_mib"] = built
    row["above_floor_mib"] = row["peak_rss_mib"] - floor
    row["rss_covers"] = "calls" if step_only else "process"
    return row


# ---------------------------------------------------------------- the parent


def run_child(name: str, warmup: int, steps: int, timeout: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.isolated", "--child", name]
    cmd += ["--warmup", str(warmup), "--steps", str(steps)]
    # transformers imports torch wherever it is installed (~300 MiB of RSS here);
    # a JAX candidate never calls it, so its process starts without it
    env = dict(os.environ, **({} if uses_torch(name) else {"USE_TORCH": "0"}))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"candidate {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def ratio_interval(ratios: list[float]) -> tuple[float, float, float]:
    """Geometric mean of per-round ratios and its 95 % t-interval (lo, hi)."""
    logs = [math.log(r) for r in ratios]
    mean = statistics.fmean(logs)
    if len(logs) < 2:
        return math.exp(mean), math.nan, math.nan
    half = _T975[min(len(logs) - 1, len(_T975)) - 1] * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def measure(names: list[str], *, rounds: int, warmup: int, steps: int, timeout: int) -> dict:
    """Per candidate, the list of its per-round rows; children alternate order."""
    rows: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            row = run_child(name, warmup, steps, timeout)
            rows[name].append(row)
            print(
                f"round {r + 1}/{rounds} {name}: {row['median_s'] * 1e3:.0f} ms, "
                f"compile {row['compile_s'] or 0:.1f} s, rss {row['peak_rss_mib']:.0f} MiB",
                file=sys.stderr,
                flush=True,
            )
    return rows


def _spread(values: list[float], scale: float, spec: str) -> str:
    med = statistics.median(values) * scale
    if len(values) == 1:
        return format(med, spec)
    return f"{med:{spec}} ({min(values) * scale:{spec}}–{max(values) * scale:{spec}})"


def _ratio_row(rows: dict, num: str, den: str, target: float | None, key: str) -> str:
    """A table row: ``num``/``den`` of ``key`` per round, its geometric mean and interval."""
    per_round = [a[key] / b[key] for a, b in zip(rows[num], rows[den], strict=True)]
    mean, lo, hi = ratio_interval(per_round)
    interval = "–" if math.isnan(lo) else f"{lo:.3f}–{hi:.3f}"
    met = "–" if target is None else ("yes" if mean <= target else "**no**")
    if target is not None and not math.isnan(hi) and mean <= target < hi:
        met = "yes (interval spans the target)"
    goal = "–" if target is None else f"≤ {target}"
    return f"| `{num}` / `{den}` | {mean:.3f} | {interval} | {goal} | {met} |"


def render(rows: dict[str, list[dict]], *, header: str) -> str:
    """Markdown: one row per candidate, then the ratios with their intervals."""
    lines = [
        header,
        "",
        "| candidate | what | median call, ms (range over rounds) | compile s "
        "| XLA step MiB | peak RSS MiB | import floor MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, runs in rows.items():
        what = CANDIDATES[name]
        if "decode" in name:
            what += f": {_spread([r['tokens_per_s'] for r in runs], 1, '.1f')}"
        compile_s = [r["compile_s"] for r in runs if r["compile_s"] is not None]
        xla = [r["xla_mib"] for r in runs if r.get("xla_mib") is not None]
        floor = [r["floor_rss_mib"] for r in runs if r.get("floor_rss_mib") is not None]
        lines.append(
            f"| `{name}` | {what} | {_spread([r['median_s'] for r in runs], 1e3, '.0f')} | "
            f"{_spread(compile_s, 1, '.1f') if compile_s else '–'} | "
            f"{_spread(xla, 1, '.0f') if xla else '–'} | "
            f"{_spread([r['peak_rss_mib'] for r in runs], 1, '.0f')} | "
            f"{_spread(floor, 1, '.0f') if floor else '–'} |"
        )
    for title, pairs, key in (
        ("call times", RATIOS, "median_s"),
        ("XLA step memory", RSS_RATIOS, "xla_mib"),
        ("peak RSS", RSS_RATIOS, "peak_rss_mib"),
        ("peak RSS above the import floor", RSS_RATIOS, "above_floor_mib"),
    ):
        pairs = [
            (n, d, target)
            for n, d, target in pairs
            if n in rows and d in rows and all(r.get(key) for r in rows[n] + rows[d])
        ]
        if pairs:
            lines += ["", f"| ratio of {title} | geometric mean | 95 % interval | target | met |"]
            lines += ["|---|---|---|---|---|"]
        lines += [_ratio_row(rows, num, den, target, key) for num, den, target in pairs]
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=positive_int, default=5)
    parser.add_argument("--steps", type=positive_int, default=12)
    parser.add_argument("--warmup", type=count, default=2)
    parser.add_argument(
        "--candidates", default=",".join(CANDIDATES), help="comma-separated; see CANDIDATES"
    )
    parser.add_argument("--timeout", type=positive_int, default=900, help="seconds per child")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.warmup, args.steps)))
        return ""
    names = [n.strip() for n in args.candidates.split(",") if n.strip()]
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        parser.error(f"unknown --candidates {unknown}; choose from {list(CANDIDATES)}")
    rows = measure(
        names, rounds=args.rounds, warmup=args.warmup, steps=args.steps, timeout=args.timeout
    )
    from benchmarks.suite import publish

    setup = (
        f"each candidate in its own process, {args.rounds} rounds in alternating order; "
        f"per child {args.warmup} warm-up calls, then the median of {args.steps}"
    )
    table = lambda header: render(rows, header=header)
    return publish("benchmarks.isolated", argv, setup, table, args.out, begin=BEGIN, end=END)


if __name__ == "__main__":
    main()
