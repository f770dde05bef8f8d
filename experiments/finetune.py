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
``llm_adapters/<family>/`` or ``--eval-data``.

Loading notes (transformers 4.57 Flax): sharded safetensors checkpoints are read
here (``from_pretrained`` does not support them); Qwen2 has no Flax class and
runs as a Flax Llama with q/k/v biases (``o_proj`` bias zero); the Flax Llama's
rotary table, which ignores ``rope_theta``, is replaced by one that uses it
(Llama-3: 500,000; Qwen2.5: 1,000,000); ``max_position_embeddings`` is capped
at `MAX_POSITIONS`, which prompts plus answers never reach here.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import genlora_jax as gl
from experiments import choice, scoring
from experiments import data as data_lib
from experiments.cli import count, positive_float, positive_int
from experiments.generate import evaluate_tasks
from experiments.presets import ARCHITECTURES, MODELS, PRESETS, Preset, get_preset
from experiments.train import TrainConfig, train
from genlora_jax import models
from genlora_jax.models import patch_llama_rope

MAX_POSITIONS = 2048
"""Cap on ``max_position_embeddings``: Flax Llama/Gemma build (P, P) causal
masks and rotary tables of this size; 131,072 (Qwen2.5) would not fit."""

_HUB_PATTERNS = ["*.json", "*.safetensors", "*.msgpack", "*.model", "*.txt", "tokenizer*"]


# --------------------------------------------------------------------------- model


def flax_config(config):
    """A copy of ``config`` that the `transformers` Flax causal LMs run faithfully.

    Qwen2 becomes a Llama with q/k/v/o biases (the o bias is filled with zeros
    on load); ``max_position_embeddings`` is capped at `MAX_POSITIONS`.

    Raises:
        NotImplementedError: features the Flax models lack (RoPE scaling,
            sliding windows, Gemma with θ ≠ 10,000).
    """
    from transformers import LlamaConfig

    config = copy.deepcopy(config)
    if getattr(config, "rope_scaling", None):
        raise NotImplementedError(
            f"{config.model_type}: rope_scaling={config.rope_scaling} is not implemented by "
            "the transformers Flax models; use a checkpoint without RoPE scaling (Llama-3, "
            "not Llama-3.1)."
        )
    if config.model_type == "qwen2":
        if getattr(config, "use_sliding_window", False):
            raise NotImplementedError("Qwen2 with use_sliding_window=True has no Flax port.")
        config = LlamaConfig(
            **{
                key: getattr(config, key)
                for key in (
                    "vocab_size",
                    "hidden_size",
                    "intermediate_size",
                    "num_hidden_layers",
                    "num_attention_heads",
                    "num_key_value_heads",
                    "hidden_act",
                    "max_position_embeddings",
                    "rms_norm_eps",
                    "rope_theta",
                    "tie_word_embeddings",
                    "bos_token_id",
                    "eos_token_id",
                )
            },
            attention_bias=True,
        )
    elif config.model_type == "gemma" and float(getattr(config, "rope_theta", 1e4)) != 1e4:
        raise NotImplementedError(
            f"the Flax Gemma hard-codes rope_theta=10000, the config has {config.rope_theta}."
        )
    if config.model_type == "llama" and float(getattr(config, "rope_theta", 1e4)) != 1e4:
        patch_llama_rope()
    config.max_position_embeddings = min(config.max_position_embeddings, MAX_POSITIONS)
    return config


def init_model(config, dtype=jnp.float32):
    """A `transformers` Flax causal LM for ``config`` with its parameter shapes.

    Returns:
        ``(model, shapes)``: the model (no weights, ``_do_init=False``) and a
        tree of `jax.ShapeDtypeStruct`.
    """
    from transformers import FlaxAutoModelForCausalLM

    model = FlaxAutoModelForCausalLM.from_config(config, dtype=dtype, _do_init=False)
    shapes = jax.eval_shape(
        functools.partial(model.init_weights, input_shape=(1, 1)), jax.random.key(0)
    )
    return model, shapes


def resolve_model_folder(name_or_path: str) -> Path:
    """A local folder holding the model, downloading a hub id when online.

    Raises:
        FileNotFoundError: a local path that does not exist, or a hub id that
            cannot be reached; the message says to pass ``--model`` with a
            local folder.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") != 1:
        raise FileNotFoundError(
            f"--model {name_or_path}: no such folder. Pass --model with a local folder holding "
            "config.json, the tokenizer and *.safetensors (or flax_model.msgpack)."
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name_or_path, allow_patterns=_HUB_PATTERNS))
    except Exception as err:
        raise FileNotFoundError(
            f"cannot fetch {name_or_path!r} from the Hugging Face hub ({type(err).__name__}); "
            "offline, or for a gated model without a token, pass --model with a local folder "
            "holding config.json, the tokenizer and *.safetensors (or flax_model.msgpack)."
        ) from err


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / shard for shard in shards]
    return sorted(folder.glob("*.safetensors"))


def load_safetensors_params(
    files: Iterable[Path], shapes: Mapping, config, dtype=jnp.float32
) -> dict:
    """Reads PyTorch-named safetensors (one file or shards) into a Flax tree.

    ``a.b.weight`` becomes ``a/b/kernel`` (transposed) for dense layers,
    ``a/b/embedding`` for embeddings and stays ``weight`` for RMS norms.
    Missing ``o_proj`` biases (Qwen2 as Llama) are zeros; a missing ``lm_head``
    of a model with tied embeddings is the embedding's transpose.

    Args:
        files: the ``*.safetensors`` files.
        shapes: the model's parameter shapes (`init_model`).
        config: its config.
        dtype: dtype of the loaded floating-point arrays.

    Returns:
        The parameter tree.

    Raises:
        ValueError: a tensor's shape differs from the model's, or weights are
            missing; the message names them.
    """
    from flax import traverse_util
    from safetensors import safe_open

    expected = traverse_util.flatten_dict(shapes)
    flat: dict[tuple[str, ...], jax.Array] = {}
    for file in files:
        with safe_open(str(file), framework="flax") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                *module, leaf = name.split(".")
                key, tensor = _flax_key(tuple(module), leaf, expected), f.get_tensor(name)
                if key is None:
                    continue
                if key[-1] == "kernel":
                    tensor = tensor.T
                if tensor.shape != expected[key].shape:
                    raise ValueError(
                        f"{file.name}: {name} has shape {tensor.shape}, the model expects "
                        f"{expected[key].shape} at {'/'.join(key)}; is config.json from the "
                        "same checkpoint?"
                    )
                flat[key] = tensor.astype(dtype)
    for key in set(expected) - set(flat):
        if key[-2:] == ("o_proj", "bias"):
            flat[key] = jnp.zeros(expected[key].shape, dtype)
        elif key == ("lm_head", "kernel") and getattr(config, "tie_word_embeddings", False):
            flat[key] = flat[("model", "embed_tokens", "embedding")].T
    missing = sorted("/".join(key) for key in set(expected) - set(flat))
    if missing:
        raise ValueError(
            f"the checkpoint lacks {len(missing)} weights of the model, e.g. {missing[:3]}; "
            "is it a causal LM checkpoint of this architecture?"
        )
    return traverse_util.unflatten_dict(flat)


def _flax_key(module: tuple[str, ...], leaf: str, expected: Mapping) -> tuple[str, ...] | None:
    """The Flax key of PyTorch tensor ``module.leaf``, or None if the model has none."""
    candidates = [(*module, leaf)]
    if leaf == "weight":
        candidates += [(*module, "kernel"), (*module, "embedding"), (*module, "scale")]
    return next((key for key in candidates if key in expected), None)


def load_pretrained(name_or_path: str, dtype=jnp.bfloat16):
    """Loads ``(model, params, tokenizer)`` from a folder, the hub, or a llama
    ``.gguf`` file (or ``smollm2``, the packaged one; `genlora_jax.models`).

    The tokenizer's pad token falls back to EOS (Llama-3 has none; padding is
    masked everywhere and answers are cut at the first EOS).
    """
    from flax.serialization import msgpack_restore
    from transformers import AutoConfig, AutoTokenizer

    if models.is_gguf(name_or_path):
        return models.load_gguf(name_or_path, dtype=dtype)
    folder = resolve_model_folder(name_or_path)
    config = flax_config(AutoConfig.from_pretrained(folder))
    model, shapes = init_model(config, dtype)
    if (folder / "flax_model.msgpack").is_file():
        params = msgpack_restore((folder / "flax_model.msgpack").read_bytes())
        params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
    elif files := _safetensors_files(folder):
        params = load_safetensors_params(files, shapes, config, dtype)
    else:
        found = sorted(p.name for p in folder.iterdir())
        raise FileNotFoundError(
            f"{folder} has neither *.safetensors nor flax_model.msgpack (found {found})."
        )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, params, tokenizer


def training_text(record: Mapping[str, Any]) -> str:
    """The Alpaca prompt of an instruction record followed by its output."""
    return (
        data_lib.alpaca_prompt(record["instruction"], record.get("input") or "") + record["output"]
    )


def tiny_tokenizer(texts: Iterable[str], vocab_size: int = 1024):
    """A byte-level BPE trained on ``texts``: cased, lossless, offline.

    Like Llama's, it prepends BOS ``<s>`` and appends nothing; ``<pad>`` = 0,
    ``<s>`` = 1, ``</s>`` (EOS) = 2.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def tiny_model(preset: Preset, tokenizer, seed: int = 0):
    """A random Llama of the preset's ``tiny_config``; returns ``(model, params)``."""
    from transformers import FlaxLlamaForCausalLM, LlamaConfig

    config = LlamaConfig(
        **preset.tiny_config,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = FlaxLlamaForCausalLM(config, seed=seed)
    return model, model.params


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


def load_eval_tasks(
    tasks: Sequence[str], family: str, eval_dir: str | None, limit: int | None
) -> dict[str, Any]:
    """Test records of each task: ``<eval_dir>/<task>/test.json``, first ``limit``.

    ``eval_dir`` defaults to ``<data root>/llm_adapters/<family>``.

    Raises:
        FileNotFoundError: a task has no ``test.json``; the message lists the
            tasks that do.
    """
    if eval_dir:
        root = Path(eval_dir).expanduser()
    elif (data_root := data_lib.default_data_dir()) is not None:
        label_tasks = all(scoring.TASK_KINDS.get(t) == scoring.LABEL for t in tasks)
        root = data_root / "llm_adapters" / ("commonsense" if label_tasks else "math")
    else:
        raise FileNotFoundError(
            f"no data root; pass --eval-data DIR holding <task>/test.json or set "
            f"{data_lib.DATA_ENV_VAR}."
        )
    missing = [task for task in tasks if not (root / task / "test.json").is_file()]
    if missing:
        present = sorted(p.parent.name for p in root.glob("*/test.json"))
        raise FileNotFoundError(
            f"no test.json for {missing} under {root}; pass --eval-data DIR (LLM-Adapters' "
            f"dataset/ folder) or restrict the tasks, e.g. --tasks {' '.join(present)}."
        )
    out = {}
    for task in tasks:
        records = data_lib.load_instruction_dataset(str(root / task), split="test")
        if limit:
            records = records.select(range(min(limit, len(records))))
        out[scoring.canonical_task(task)] = records
    return out


# --------------------------------------------------------------------------- train


def causal_lm_loss(model):
    """Mean next-token cross-entropy over the tokens ``loss_mask`` keeps.

    Position t predicts ``labels[:, t + 1]`` from ``logits[:, t]``; the mean is
    over the counted tokens of the micro-batch (as Hugging Face's loss), and
    gradient accumulation averages micro-batches.
    """

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
        choices=["generate", "likelihood", "both"],
        help="LLM-Adapters' generated label, option likelihood (experiments.choice), or both "
        "(default: the preset's)",
    )
    parser.add_argument(
        "--train-format",
        choices=["llm-adapters", "option"],
        help="Alpaca prompt + output, or question + the correct option (default: the preset's)",
    )
    parser.add_argument("--lr", type=positive_float, help="peak learning rate (default: preset's)")
    parser.add_argument("--dry-run", action="store_true", help="print parameter counts and stop")
    parser.add_argument("--list", action="store_true", help="print the preset names and stop")
    args = parser.parse_args(argv)
    if not args.list and not args.preset:
        parser.error("--preset is required (see --list)")
    return args


def dry_run(preset: Preset, model: str | None) -> dict[str, int]:
    """Trainable and frozen counts from shapes only (no weights are read)."""
    from transformers import AutoConfig, LlamaConfig

    if model and models.is_gguf(model):
        config = models.read_config(model)
    elif model:
        config = AutoConfig.from_pretrained(resolve_model_folder(model))
    elif preset.tiny_config is not None:
        config = LlamaConfig(**preset.tiny_config, vocab_size=1024)
    else:
        key = next(k for k in ARCHITECTURES if MODELS.get(k, k) == preset.model)
        fields = dict(ARCHITECTURES[key])
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    _, shapes = init_model(flax_config(config))
    wrapped = jax.eval_shape(
        lambda p: gl.wrap(p, list(preset.targets), preset.adapter_config()), shapes
    )
    count = gl.count_params(wrapped)
    return {"trainable": count.trainable, "frozen": count.frozen}


def format_table(accuracy: Mapping[str, float]) -> str:
    """Markdown table of per-task accuracies (%) and their average."""
    lines = ["| task | accuracy |", "| --- | ---: |"]
    lines += [f"| {task} | {100 * value:.2f} |" for task, value in accuracy.items()]
    return "\n".join(lines)


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
        tasks = load_eval_tasks(
            args.tasks or preset.eval_tasks, preset.family, args.eval_data, args.eval_limit
        )
        train_set = data_lib.load_instruction_dataset(train_path)
        if preset.model is None and not args.model:
            tokenizer = tiny_tokenizer(map(training_text, train_set))
            model, params = tiny_model(preset, tokenizer, args.seed)
        else:
            model, params, tokenizer = load_pretrained(
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
    train_seconds = time.perf_counter() - start
    trained = gl.join(gl.split(wrapped)[0], state.adapters)

    num_beams = 1 if args.greedy else preset.num_beams
    max_new_tokens = args.max_new_tokens or preset.max_new_tokens
    scoring_mode = args.scoring or preset.scoring
    responses: dict[str, list[str]] = {}
    accuracy, likelihood = {}, {}
    start = time.perf_counter()
    if scoring_mode in ("generate", "both"):
        accuracy = evaluate_tasks(
            model,
            trained,
            tokenizer,
            tasks,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            batch_size=args.eval_batch_size or preset.eval_batch_size,
            responses=responses,
        )
    if scoring_mode in ("likelihood", "both"):
        for task, records in tasks.items():
            s = choice.score_choices(model, trained, tokenizer, list(records), desc=task)
            likelihood[task] = {
                "acc": s.acc,
                "acc_se": s.stderr(s.acc),
                "acc_norm": s.acc_norm,
                "acc_norm_se": s.stderr(s.acc_norm),
                "chance": s.chance,
                "predictions": s.predictions,
            }
        if scoring_mode == "likelihood":
            accuracy = scoring.summarize({t: v["acc"] for t, v in likelihood.items()})
    eval_seconds = time.perf_counter() - start

    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    results = {
        "preset": preset.name,
        "model": args.model or preset.model or "random tiny Llama (no weights)",
        "train_data": train_path,
        "method": preset.method,
        "adapter": repr(preset.adapter_config()),
        "trainable_params": count.trainable,
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
            t: {k: v for k, v in m.items() if k != "predictions"} for t, m in likelihood.items()
        },
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    with (out / "predictions.jsonl").open("w") as f:
        for task, records in tasks.items():
            for i, record in enumerate(records):
                row: dict[str, Any] = {"task": task, "answer": record["answer"]}
                if task in responses:
                    reply = responses[task][i]
                    row.update(
                        response=reply, correct=scoring.is_correct(task, reply, record["answer"])
                    )
                if task in likelihood:
                    by_sum, by_char = likelihood[task]["predictions"][i]
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
