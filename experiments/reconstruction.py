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

    python -m experiments.reconstruction --steps 64 --out runs/reconstruction

Data: ``<data>/glue_sst2/{train,dev}.tsv`` with ``--data`` or $GENLORA_DATA
(default ``../shared/data`` beside the repository), read by
`experiments.data.load_sst2`; training runs on the shared loop of
`experiments.train` (``metrics.jsonl`` and ``loss.png`` per method under
``--out``) and dev accuracy is `experiments.evaluate.ClassificationAccuracy`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np
import transformers

import genlora_jax as gl
from experiments import data as data_lib
from experiments.classify import classification_loss
from experiments.cli import count, positive_float, positive_int
from experiments.evaluate import ClassificationAccuracy
from experiments.models import ATTENTION_TARGETS, minilm_path
from experiments.train import TrainConfig
from experiments.train import train as train_loop

TARGETS = ATTENTION_TARGETS["bert"]
BUCKET = 16
"""Training batches are cut to a multiple of this many tokens (`data.trim_padding`)."""


def length_sorted_batches(arrays: dict[str, np.ndarray], batch_size: int) -> list[dict]:
    """Batches of examples of similar length, each cut to a `BUCKET` multiple.

    SST-2 is mostly short phrases (median 10 tokens), so padding every batch to
    the full length would waste most of the compute; sorting by length (as
    `transformers`' ``group_by_length``) keeps the number of compiled shapes
    small. Callers shuffle the batch order.

    Args:
        arrays: `experiments.data.tokenize_classification` arrays, (N, L) and (N,).
        batch_size: B; the last batch holds the remainder.

    Returns:
        ⌈N / B⌉ batches of (B, L') arrays, L' ≤ L.
    """
    order = np.argsort(arrays["attention_mask"].sum(1), kind="stable")
    return [
        data_lib.trim_padding({k: v[rows] for k, v in arrays.items()}, BUCKET)
        for rows in (order[i : i + batch_size] for i in range(0, len(order), batch_size))
    ]


def train(model, config, train_batches, dev_arrays, args) -> tuple[dict, dict]:
    """Adapter training on the shared loop (`experiments.train`: AdamW without
    weight decay, linear warm-up and decay, as the paper), one batch per step.

    Returns:
        The trained wrapped params, and a summary (losses, dev accuracy, seconds).
    """
    params = gl.wrap(
        model.params, TARGETS, config, rng=jax.random.key(args.seed), extra_trainable=["classifier"]
    )
    cfg = TrainConfig(
        steps=len(train_batches),
        lr=args.lr,
        warmup_steps=min(100, args.steps // 10),
        seed=args.seed,
        log_every=1,
    )
    out = args.out / f"train-{config.method}"
    start = time.perf_counter()
    state = train_loop(
        params,
        classification_loss(model),
        train_batches.__getitem__,
        cfg,
        out_dir=out,
        desc=type(config).__name__,
    )
    seconds = time.perf_counter() - start
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = gl.join(gl.split(params)[0], state.adapters)
    summary = {
        "trainable": gl.count_params(params).trainable,
        "loss_first_20": float(np.mean(losses[:20])),
        "loss_last_20": float(np.mean(losses[-20:])),
        "dev_accuracy": ClassificationAccuracy(model)(trained, dev_arrays),
        "train_seconds": round(seconds, 1),
    }
    return trained, summary


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
        "--data", default=None, help="data root holding glue_sst2/ (default: $GENLORA_DATA)"
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
        args.model = minilm_path()
    model = transformers.FlaxBertForSequenceClassification.from_pretrained(args.model, num_labels=2)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    rng = np.random.default_rng(args.seed)
    train_set = data_lib.load_sst2(args.data, "train")
    subset = rng.permutation(len(train_set))[: args.steps * args.batch_size]
    train_arrays = data_lib.tokenize_classification(
        train_set.select(subset), tokenizer, args.max_len
    )
    train_batches = length_sorted_batches(train_arrays, args.batch_size)
    train_batches = [train_batches[i] for i in rng.permutation(len(train_batches))]
    dev_arrays = data_lib.tokenize_classification(
        data_lib.load_sst2(args.data, "dev"), tokenizer, args.max_len
    )

    configs = {
        f"LoRA r={args.rank}": gl.LoRAConfig(rank=args.rank),
        f"GenLoRA r={args.rank}, G={args.groups}": gl.GenLoRAConfig(
            rank=args.rank, groups=args.groups
        ),
    }
    trained, training = {}, {}
    for name, config in configs.items():
        trained[name], training[name] = train(model, config, train_batches, dev_arrays, args)
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
