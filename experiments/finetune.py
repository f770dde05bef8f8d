"""Generative fine-tuning and evaluation of a causal LM with adapters (LLM-Adapters).

Trains the preset's adapter on its instruction mixture (Alpaca prompt +
output + EOS, cut at 256 tokens, next-token loss), then generates on each test
set and scores it by ``../shared/docs/EVAL_PROTOCOL.md``; writes
``results.json``, ``predictions.jsonl``, ``metrics.jsonl`` and ``loss.png``
under ``--out`` and prints a per-task table::

    python -m experiments.finetune --preset llama3-8b-math-genlora-r8g16 --model /models/llama3-8b
    python -m experiments.finetune --preset tiny-llama-math-genlora --steps 20 --eval-limit 4
    python -m experiments.finetune --list                  # every preset
    python -m experiments.finetune --preset qwen2.5-14b-commonsense-lora-r8 --dry-run

``--model`` is a local folder (``config.json``, tokenizer, ``*.safetensors``
or ``flax_model.msgpack``) or a hub id, fetched when online. Training data is
the preset's file under ``$GENLORA_DATA/llm_adapters/`` (else
``../shared/data``) or ``--data``; test sets are ``<task>/test.json`` under
``llm_adapters/<family>/`` or ``--eval-data``. Models load with
`experiments.models` (its docstring has the loading notes).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import genlora_jax as gl
from experiments import choice, evaluate, models, scoring
from experiments import data as data_lib
from experiments.cli import count, markdown_table, positive_float, positive_int
from experiments.presets import ARCHITECTURES, MODELS, PRESETS, Preset, get_preset
from experiments.train import TrainConfig, train
from genlora_jax import models as gguf


def training_text(record: Mapping[str, Any]) -> str:
    """The Alpaca prompt of an instruction record followed by its output."""
    return (
        data_lib.alpaca_prompt(record["instruction"], record.get("input") or "") + record["output"]
    )


# ---------------------------------------------------------------------------- data


def resolve_train_data(preset: Preset, data: str | None) -> str:
    """``--data``, else the preset's file under the data root.

    Raises:
        FileNotFoundError: no such file; the message says where it was sought.
    """
    if data:
        return data
    name = Path(preset.train_data).name
    root = data_lib.default_data_dir()
    candidates = [root / preset.train_data, root / name] if root else []
    for path in candidates:
        if path.is_file():
            return str(path)
    raise FileNotFoundError(
        f"{preset.name} trains on {name}, not found (looked at {[str(p) for p in candidates]}); "
        f"pass --data /path/to/{name} (LLM-Adapters' ft-training_set/) or set "
        f"{data_lib.DATA_ENV_VAR}."
    )


# --------------------------------------------------------------------------- train


LEAN_LOSS_CHUNK = 128
"""Tokens per slice of the position-chunked loss in `benchmarks.step_memory`'s
rows: 128 × 49,152 float32 logits are 24 MiB."""

LEAN_VOCAB_ROWS = 6144
"""Vocabulary rows per slice of the loss in the low-memory setting
(`lean_causal_lm_loss`: ``experiments.llm --lean``, the ``-lean`` benchmarks):
1,016 positions × 6,144 float32 logits are 24 MiB, SmolLM2's head 8 slices."""


def causal_lm_loss(model, chunk: int = 0, *, fused: bool = False, vocab_rows: int = 0):
    """Mean next-token cross-entropy over the tokens ``loss_mask`` keeps.

    Position t predicts ``labels[:, t + 1]`` from ``logits[:, t]``; the mean is
    over the counted tokens of the micro-batch (as Hugging Face's loss), and
    gradient accumulation averages micro-batches.

    Args:
        model: a `transformers` Flax causal LM.
        chunk: 0 computes the (B, L, V) logits at once. N > 0 (a Llama only)
            runs the model without its head and computes the loss N tokens at
            a time (`chunked_head_loss`): the same value and
            gradients, and the peak holds one (N, V) slice of logits instead
            of all of them.
        fused: with ``chunk``, `chunked_head_loss`'s fused gradient: a third
            less work in the head, more memory at the step's peak (measured
            on SmolLM2: +108 MiB of 859). Off by default: the chunked loss is
            there to save memory.
        vocab_rows: N > 0 (a Llama only, instead of ``chunk``) runs the model
            without its head and computes the loss N words of the vocabulary
            at a time for every position (`vocab_sliced_head_loss`): the
            same value and gradients, one (B·L, N) slice of logits at the
            peak, and a quantized head dequantized twice per step instead of
            three times per chunk.
    """
    if chunk and vocab_rows:
        raise ValueError(
            f"chunk={chunk} and vocab_rows={vocab_rows}: the loss is cut by positions or by "
            "the vocabulary, not both; pass one of them."
        )
    if fused and not chunk:
        raise ValueError("fused=True applies to the chunked loss; pass chunk=N too, or drop it.")
    if chunk or vocab_rows:
        return _chunked_causal_lm_loss(model, chunk, fused, vocab_rows)

    def loss_fn(params, batch, rng):
        logits = gl.apply(
            model, params, batch["input_ids"], batch["attention_mask"], adapter_rng=rng
        ).logits
        ce = optax.softmax_cross_entropy_with_integer_labels(
            logits[:, :-1].astype(jnp.float32), batch["labels"][:, 1:]
        )
        mask = batch["loss_mask"][:, 1:]
        return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    return loss_fn


def lean_causal_lm_loss(model):
    """The low-memory setting's loss: `causal_lm_loss` cut by the vocabulary,
    `LEAN_VOCAB_ROWS` words at a time. Same value and gradients as the
    whole-logits loss."""
    return causal_lm_loss(model, vocab_rows=LEAN_VOCAB_ROWS)


def _chunked_causal_lm_loss(model, chunk: int, fused: bool, vocab_rows: int = 0):
    if model.config.model_type != "llama":
        raise ValueError(
            f"a chunked loss needs the Llama layout (model.model → hidden, lm_head), got a "
            f"{model.config.model_type!r} model; use the whole-logits loss (chunk=0, "
            "vocab_rows=0; no --lean)."
        )

    def hidden(module, ids, mask, positions):
        return module.model(ids, mask, positions, return_dict=False)[0]

    def loss_fn(params, batch, rng):
        head = gl.model_params(params)["lm_head"]
        if gl.ADAPTER_KEY in head:
            raise ValueError(
                "the chunked loss applies lm_head's kernel directly and would skip its "
                "adapter; use the whole-logits loss (chunk=0, vocab_rows=0; no --lean) when "
                "lm_head is adapted."
            )
        ids = batch["input_ids"]
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        h = gl.apply(
            model.module, params, ids, batch["attention_mask"], positions,
            adapter_rng=rng, method=hidden,
        )  # fmt: skip
        mask = batch["loss_mask"][:, 1:]
        if vocab_rows:
            total = vocab_sliced_head_loss(
                h[:, :-1], head["kernel"], batch["labels"][:, 1:], mask, vocab_rows, model.dtype
            )
        else:
            total = chunked_head_loss(
                h[:, :-1], head["kernel"], batch["labels"][:, 1:], mask, chunk, model.dtype,
                fused=fused,
            )  # fmt: skip
        return total / jnp.maximum(jnp.sum(mask), 1.0)

    return loss_fn


def chunked_head_loss(
    hidden, kernel, labels, mask, chunk: int, dtype=None, *, fused: bool = False
) -> jax.Array:
    """Σ mask · cross-entropy(hidden @ kernel, labels), ``chunk`` positions at a time.

    No pass holds more than a (chunk, V) slice of the logits. By default each
    chunk's logits are recomputed in the backward pass (`jax.checkpoint`).
    ``fused=True`` computes each chunk's gradient with respect to ``hidden``
    in the forward scan, next to its loss (`jax.custom_vjp`), so the backward
    pass only scales it: the head's matmul runs twice per chunk instead of
    three times, and the chunk's softmax gradient is built while every
    layer's saved state is still alive, which raises the step's peak. The
    two give the same value and gradients (the same per-chunk arithmetic,
    differentiated by JAX).

    A gradient with respect to ``kernel`` is exact either way; fused, it is
    computed by recomputing the logits in the backward pass, and when the
    head is frozen (the adapters' training step) that computation is unused
    and compiled away.

    Args:
        hidden: (B, T, D) final hidden states.
        kernel: (D, V) head kernel, float or a `genlora_jax.quant.QuantizedKernel`.
        labels: (B, T) int next tokens.
        mask: (B, T) 1 where the token counts.
        chunk: positions per slice; B·T is padded to a multiple of it.
        dtype: the head's compute dtype (the model's); None keeps hidden's.
        fused: the gradient computed in the forward scan (see above).

    Returns:
        () float32, the masked sum (divide by the mask's sum for the mean).
    """
    d = hidden.shape[-1]
    h = hidden.reshape(-1, d)
    y = labels.reshape(-1)
    m = mask.reshape(-1).astype(jnp.float32)
    pad = -h.shape[0] % chunk
    h, y, m = (jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)) for x in (h, y, m))
    n = h.shape[0] // chunk
    h, y, m = h.reshape(n, chunk, d), y.reshape(n, chunk), m.reshape(n, chunk)

    def piece_loss(h_c, k, y_c, m_c):
        """(chunk, D) → () the chunk's masked cross-entropy sum."""
        if isinstance(k, gl.quant.QuantizedKernel):  # W (V, D) float a slice at a time
            logits = gl.quant.dense_in_slices(h_c, k, dtype)
        else:
            logits = h_c.astype(dtype or h_c.dtype) @ k.astype(dtype or h_c.dtype)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y_c)
        return jnp.sum(ce * m_c)

    def recomputing(h, k):
        """The sum, each chunk's logits recomputed in the backward pass."""

        @jax.checkpoint
        def piece(total, xs):
            return total + piece_loss(xs[0], k, *xs[1:]), None

        return jax.lax.scan(piece, jnp.zeros((), jnp.float32), (h, y, m))[0]

    if not fused:
        return recomputing(h, kernel)

    def with_hidden_grads(h, k):
        """The sum, and each chunk's gradient with respect to its hidden states."""

        def piece(total, xs):
            value, grad = jax.value_and_grad(piece_loss)(xs[0], k, *xs[1:])
            return total + value, grad

        total, grads = jax.lax.scan(piece, jnp.zeros((), jnp.float32), (h, y, m))
        return total, (grads, h, k)

    def backward(saved, g):
        grads, h, k = saved
        # the head's gradient, recomputed; dead code (removed) when the head is frozen
        _, head_vjp = jax.vjp(lambda k: recomputing(h, k), k)
        return (grads * g).astype(grads.dtype), head_vjp(g)[0]

    total_of = jax.custom_vjp(lambda h, k: recomputing(h, k))
    total_of.defvjp(with_hidden_grads, backward)
    return total_of(h, kernel)


def vocab_sliced_head_loss(hidden, kernel, labels, mask, rows: int, dtype=None) -> jax.Array:
    """Σ mask · cross-entropy(hidden @ kernel, labels), ``rows`` words of the
    vocabulary at a time for every position (an online log-sum-exp).

    `chunked_head_loss` cuts the positions and takes the whole head for each
    chunk, so a quantized head is dequantized three times per chunk (forward,
    recomputation, backward). Cutting the vocabulary instead dequantizes each
    slice of the head once in the forward pass and once in the backward pass
    for the whole batch, with the same head matmuls (three per slice: the
    logits, their recomputation, the hidden states' gradient). The peak holds
    a (B·T, rows) slice of logits. `jax.custom_vjp`: the forward pass keeps
    each position's log-sum-exp (B·T floats), the backward pass recomputes
    each slice's logits and takes softmax − one-hot. Gradients are exact,
    the head's too (computed only when asked for; compiled away when the
    head is frozen).

    Args:
        hidden: (B, T, D) final hidden states.
        kernel: (D, V) head kernel, float or a `genlora_jax.quant.QuantizedKernel`.
        labels: (B, T) int next tokens in [0, V); where ``mask`` is 0 any
            value (e.g. -100), where it is 1 one outside makes the sum NaN.
        mask: (B, T) 1 where the token counts.
        rows: the most vocabulary rows per slice; V is cut into the fewest
            equal slices that respect it (`genlora_jax.quant.slice_plan`).
        dtype: the head's compute dtype (the model's); None keeps hidden's.

    Returns:
        () float32, the masked sum (divide by the mask's sum for the mean).
    """
    d = hidden.shape[-1]
    vocab = kernel.shape[-1]
    if rows < 1:
        raise ValueError(f"rows={rows}: a slice needs at least one word of the vocabulary.")
    count, size = gl.quant.slice_plan(vocab, rows)
    # slice i covers words [start_i, start_i + size) and counts those from i · size on
    # (the last slice starts early when size does not divide V, never past the end)
    starts = gl.quant.slice_starts(vocab, count, size)
    h = hidden.reshape(-1, d)
    y = labels.reshape(-1)
    m = mask.reshape(-1).astype(jnp.float32)
    quantized = isinstance(kernel, gl.quant.QuantizedKernel)
    compute = dtype or h.dtype

    def weight(k, start, anchor):
        """Words [start, start + size) of W, (size, D): float, dequantized after ``anchor``."""
        if quantized:
            return gl.quant.weight_after(k.rows(start, size), anchor)
        return jax.lax.dynamic_slice_in_dim(k, start, size, axis=1).T

    def slice_logits(h, w, i, start):
        """(B·T, size) float32 logits, −inf on the words an earlier slice counted."""
        z = (h.astype(compute) @ w.astype(compute).T).astype(jnp.float32)
        counted = start + jnp.arange(size) >= i * size
        return jnp.where(counted[None, :], z, -jnp.inf)

    def forward(h, k):
        def body(carry, xs):
            i, start = xs
            top, total, picked = carry
            z = slice_logits(h, weight(k, start, h), i, start)
            new_top = jnp.maximum(top, jnp.max(z, axis=-1))
            total = total * jnp.exp(top - new_top) + jnp.sum(jnp.exp(z - new_top[:, None]), -1)
            local = y - start
            inside = (y >= i * size) & (local < size)
            here = jnp.take_along_axis(z, jnp.clip(local, 0, size - 1)[:, None], -1)[:, 0]
            return (new_top, total, picked + jnp.where(inside, here, 0.0)), None

        start = (jnp.full(y.shape, -jnp.inf), jnp.zeros(y.shape), jnp.zeros(y.shape))
        (top, total, picked), _ = jax.lax.scan(body, start, (jnp.arange(count), starts))
        lse = top + jnp.log(total)
        # a counted label outside [0, V) has no logit: NaN, as the whole-logits loss gives
        bad = (m > 0) & ((y < 0) | (y >= vocab))
        per_token = jnp.where(bad, jnp.nan, m * (lse - picked))
        return jnp.sum(per_token), (h, k, lse)

    def backward(saved, g):
        h, k, lse = saved
        scale = m * g

        def body(dh, xs):
            i, start = xs
            w = weight(k, start, g)
            z = slice_logits(h, w, i, start)
            onehot = (y - start)[:, None] == jnp.arange(size)[None, :]
            onehot = onehot & (y >= i * size)[:, None]
            dz = (jnp.exp(z - lse[:, None]) - onehot) * scale[:, None]  # (B·T, size)
            dh = dh + (dz.astype(compute) @ w.astype(compute)).astype(dh.dtype)
            dw = (dz.T.astype(compute) @ h.astype(compute)).astype(jnp.float32)  # (size, D)
            return dh, dw

        xs = (jnp.arange(count), starts)
        dh, dws = jax.lax.scan(body, jnp.zeros(h.shape, jnp.float32), xs)
        # dL/dW, W (V, D): the slices' rows, the overlapped ones zero in the last
        overlap = count * size - vocab
        dw = jnp.concatenate([dws[:-1].reshape(-1, d), dws[-1, overlap:]], axis=0)
        if quantized:
            (dk,) = jax.vjp(lambda k: k.weight(), k)[1](dw)
        else:
            dk = dw.T.astype(k.dtype)
        return dh.astype(h.dtype), dk

    total_of = jax.custom_vjp(lambda h, k: forward(h, k)[0])
    total_of.defvjp(forward, backward)
    return total_of(h, kernel)


TRAIN_BUCKET = 32
"""Training batches are cut to a multiple of this many tokens (`data.trim_padding`)."""


def micro_batches(examples: Sequence, preset: Preset, pad_id: int, seed: int):
    """Micro-step index → a (micro_batch_size, L) batch, L the longest example's
    length rounded up to `TRAIN_BUCKET` (at most ``cutoff_len``): one compilation
    per bucket instead of every batch at ``cutoff_len``, with the same loss."""
    size = preset.micro_batch_size

    def batch(step: int) -> dict[str, np.ndarray]:
        indices = data_lib.stream_indices(len(examples), seed, step * size, size)
        padded = data_lib.pad_batch([examples[int(i)] for i in indices], preset.cutoff_len, pad_id)
        return data_lib.trim_padding(padded, TRAIN_BUCKET)

    return batch


def training_examples(
    records, tokenizer, train_format: str, cutoff_len: int, train_on_inputs: bool = True
) -> list[dict]:
    """Tokenised training examples in ``train_format``: ``llm-adapters`` (Alpaca
    prompt + output, `data.tokenize_for_causal_lm`) or ``option`` (question +
    the correct option, loss on the answer, `choice.option_example`)."""
    records = tqdm(records, desc="tokenize", dynamic_ncols=True)
    if train_format == "option":
        return [choice.option_example(r, tokenizer, cutoff_len) for r in records]
    return [
        data_lib.tokenize_for_causal_lm(r, tokenizer, cutoff_len, train_on_inputs=train_on_inputs)
        for r in records
    ]


# ----------------------------------------------------------------------------- CLI


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", help="a name of experiments.presets.PRESETS")
    parser.add_argument(
        "--model", help="local folder, hub id or llama .gguf file (default: the preset's)"
    )
    parser.add_argument("--data", help="training file (default: the preset's under the data root)")
    parser.add_argument("--eval-data", help="folder holding <task>/test.json")
    parser.add_argument("--tasks", nargs="+", help="test sets (default: the preset's)")
    parser.add_argument(
        "--steps", type=positive_int, help="optimizer updates (default: the preset's)"
    )
    parser.add_argument("--eval-limit", type=positive_int, help="first N examples of each test set")
    parser.add_argument("--out", help="output folder (default: runs/finetune/<preset>)")
    parser.add_argument("--greedy", action="store_true", help="greedy instead of 4 beams")
    parser.add_argument("--max-new-tokens", type=positive_int, help="override the preset's budget")
    parser.add_argument("--eval-batch-size", type=positive_int, help="prompts per generation call")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="bfloat16",
        help="base weights and compute of a pretrained model (the tiny one is float32)",
    )
    parser.add_argument("--seed", type=count, default=0)
    parser.add_argument(
        "--checkpoint-every",
        type=count,
        default=0,
        help="orbax checkpoint every N micro-steps under OUT/checkpoints (also at the "
        "end and on Ctrl-C); rerunning the same command resumes from the latest",
    )
    parser.add_argument(
        "--scoring",
        choices=evaluate.SCORING_MODES,
        help="LLM-Adapters' generated label, option likelihood (experiments.choice), or both "
        "(default: the preset's)",
    )
    parser.add_argument(
        "--train-format",
        choices=["llm-adapters", "option"],
        help="Alpaca prompt + output, or question + the correct option (default: the preset's)",
    )
    parser.add_argument("--lr", type=positive_float, help="peak learning rate (default: preset's)")
    parser.add_argument(
        "--zero-shot",
        action="store_true",
        help="no training: score the pretrained model with the preset's prompts and scoring",
    )
    parser.add_argument("--dry-run", action="store_true", help="print parameter counts and stop")
    parser.add_argument("--list", action="store_true", help="print the preset names and stop")
    args = parser.parse_args(argv)
    if not args.list and not args.preset:
        parser.error("--preset is required (see --list)")
    return args


def dry_run(preset: Preset, model: str | None) -> dict[str, int]:
    """Trainable and frozen counts from shapes only (no weights are read)."""
    from transformers import AutoConfig, LlamaConfig

    if model and gguf.is_gguf(model):
        config = gguf.read_config(model)
    elif model:
        config = AutoConfig.from_pretrained(models.resolve_model_folder(model))
    elif preset.tiny_config is not None:
        config = LlamaConfig(**preset.tiny_config, vocab_size=1024)
    else:
        key = next(k for k in ARCHITECTURES if MODELS.get(k, k) == preset.model)
        fields = dict(ARCHITECTURES[key])
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    _, shapes = models.init_model(models.flax_config(config))
    wrapped = jax.eval_shape(
        lambda p: gl.wrap(p, list(preset.targets), preset.adapter_config()), shapes
    )
    count = gl.count_params(wrapped)
    return {"trainable": count.trainable, "frozen": count.frozen}


def format_table(accuracy: Mapping[str, float]) -> str:
    """Markdown table of per-task accuracies (%) and their average."""
    rows = [[task, f"{100 * value:.2f}"] for task, value in accuracy.items()]
    return markdown_table(["task", "accuracy"], "lr", rows)


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.list:
        print("\n".join(PRESETS))
        return {}
    try:
        preset = get_preset(args.preset)
    except KeyError as err:
        raise SystemExit(f"error: {err.args[0]}") from err
    if args.dry_run:
        counts = dry_run(preset, args.model)
        print(json.dumps({"preset": preset.name, **counts}))
        return counts
    try:
        train_path = resolve_train_data(preset, args.data)
        tasks = evaluate.load_tasks(
            args.tasks or preset.eval_tasks, preset.family, args.eval_data, args.eval_limit
        )
        train_set = data_lib.load_instruction_dataset(train_path)
        if preset.model is None and not args.model:
            tokenizer = models.tiny_tokenizer(map(training_text, train_set))
            model, params = models.tiny_model(preset, tokenizer, args.seed)
        else:
            model, params, tokenizer = models.load_pretrained(
                args.model or preset.model, jnp.dtype(args.dtype)
            )
    except (FileNotFoundError, NotImplementedError) as err:
        raise SystemExit(f"error: {err}") from err

    wrapped = gl.wrap(
        params, list(preset.targets), preset.adapter_config(), rng=jax.random.key(args.seed)
    )
    del params
    count = gl.count_params(wrapped)
    print(f"{preset.name}: {count.trainable:,} trainable, {count.frozen:,} frozen parameters")

    train_format = args.train_format or preset.train_format
    examples = training_examples(
        train_set, tokenizer, train_format, preset.cutoff_len, preset.train_on_inputs
    )
    steps = args.steps or preset.steps or max(1, preset.epochs * len(examples) // preset.batch_size)
    lr = args.lr or preset.lr
    cfg = TrainConfig(
        steps=steps,
        lr=lr,
        warmup_steps=preset.warmup_steps,
        grad_accum=preset.grad_accum,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
    )
    out = Path(args.out or Path("runs/finetune") / preset.name)
    start = time.perf_counter()
    if args.zero_shot:  # the adapters at their init: ΔW = 0, the pretrained model
        steps, trained, metrics = 0, wrapped, [{"loss": None}]
        out.mkdir(parents=True, exist_ok=True)
    else:
        # `micro_batches` is a function of the micro-step, so a run resumed from a
        # checkpoint sees the batches the interrupted one would have seen.
        state = train(
            wrapped,
            causal_lm_loss(model),
            micro_batches(examples, preset, tokenizer.pad_token_id, args.seed),
            cfg,
            out_dir=out,
            checkpoint_dir=(out / "checkpoints").absolute() if args.checkpoint_every else None,
            desc=preset.name,
        )
        trained = gl.join(gl.split(wrapped)[0], state.adapters)
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_seconds = time.perf_counter() - start

    num_beams = 1 if args.greedy else preset.num_beams
    max_new_tokens = args.max_new_tokens or preset.max_new_tokens
    scoring_mode = args.scoring or preset.scoring
    start = time.perf_counter()
    scores = evaluate.score_tasks(
        model,
        trained,
        tokenizer,
        tasks,
        scoring_mode,
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        batch_size=args.eval_batch_size or preset.eval_batch_size,
    )
    accuracy = evaluate.accuracies(scores)
    eval_seconds = time.perf_counter() - start

    results = {
        "preset": preset.name,
        "model": args.model or preset.model or "random tiny Llama (no weights)",
        "train_data": train_path,
        "method": "zero-shot" if args.zero_shot else preset.method,
        "adapter": None if args.zero_shot else repr(preset.adapter_config()),
        "trainable_params": 0 if args.zero_shot else count.trainable,
        "steps": steps,
        "examples_seen": steps * preset.batch_size,
        "lr": lr,
        "train_format": train_format,
        "scoring": scoring_mode,
        "final_loss": metrics[-1]["loss"],
        "train_seconds": round(train_seconds, 1),
        "decoding": "greedy" if num_beams == 1 else f"beam search, {num_beams} beams",
        "max_new_tokens": max_new_tokens,
        "eval_examples": {task: len(records) for task, records in tasks.items()},
        "eval_seconds": round(eval_seconds, 1),
        "accuracy": accuracy,
        "likelihood": {
            t: s.likelihood_metrics() for t, s in scores.items() if s.likelihood is not None
        },
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    with (out / "predictions.jsonl").open("w") as f:
        for task, records in tasks.items():
            for i, record in enumerate(records):
                row: dict[str, Any] = {"task": task, "answer": record["answer"]}
                if scores[task].responses is not None:
                    reply = scores[task].responses[i]
                    row.update(
                        response=reply, correct=scoring.is_correct(task, reply, record["answer"])
                    )
                if scores[task].likelihood is not None:
                    by_sum, by_char = scores[task].likelihood.predictions[i]
                    row.update(likelihood_choice=by_sum, likelihood_norm_choice=by_char)
                f.write(json.dumps(row) + "\n")
    print(format_table(accuracy))
    for task, m in results["likelihood"].items():
        print(
            f"{task} option likelihood: acc {100 * m['acc']:.2f} ± {100 * m['acc_se']:.2f}, "
            f"acc_norm {100 * m['acc_norm']:.2f} ± {100 * m['acc_norm_se']:.2f} "
            f"(chance {100 * m['chance']:.1f})"
        )
    print(f"scoring: {scoring_mode}; results in {out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
