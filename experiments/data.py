"""Datasets, tokenisation and fixed-shape batching for the GenLoRA experiments.

Instruction tuning follows LLM-Adapters (Hu et al., EMNLP 2023,
https://github.com/AGI-Edgerunners/LLM-Adapters): the training text is the
Alpaca prompt + output + EOS, cut at ``cutoff_len`` tokens, and by default the
loss covers the prompt too. See ``../shared/docs/EVAL_PROTOCOL.md``.

Local copies of the data live under the directory named by the environment
variable ``GENLORA_DATA`` (default ``../shared/data`` next to the repository);
the hubs are used only when no local copy is configured.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np

IGNORE_INDEX = -100
"""Label value of tokens that carry no loss (as in Hugging Face / LLM-Adapters)."""

DATA_ENV_VAR = "GENLORA_DATA"
"""Environment variable naming the root of the local data directory."""

_REPO_ROOT = Path(__file__).resolve().parents[1]

_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n"
    "### Response:\n"
)
_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that "
    "provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n"
    "### Response:\n"
)

_BOOLQ_INSTRUCTION = re.compile(
    r"Please answer the following question with true or false, "
    r"question: (?P<question>.*)\n\nAnswer format: true/false",
    re.DOTALL,
)


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """Returns the Alpaca / LLM-Adapters prompt, ending just before the output.

    Args:
      instruction: The task instruction.
      input: Optional further context; an empty string selects the prompt
        without an ``### Input:`` block.

    Returns:
      The prompt, ending with ``"### Response:\\n"``.

    >>> print(alpaca_prompt("Add 2 and 3."))
    Below is an instruction that describes a task. Write a response that appropriately completes the request.
    <BLANKLINE>
    ### Instruction:
    Add 2 and 3.
    <BLANKLINE>
    ### Response:
    <BLANKLINE>
    """  # noqa: E501
    if input:
        return _PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return _PROMPT_NO_INPUT.format(instruction=instruction)


def default_data_dir() -> Path | None:
    """Returns the local data root, or None when none is configured or present.

    The root is ``$GENLORA_DATA`` when that variable is set (whether or not the
    directory exists, so that a wrong setting fails loudly later), else
    ``../shared/data`` next to the repository root when that directory exists.
    """
    configured = os.environ.get(DATA_ENV_VAR)
    if configured:
        return Path(configured).expanduser()
    sibling = _REPO_ROOT.parent / "shared" / "data"
    return sibling if sibling.is_dir() else None


def _looks_local(path_or_name: str) -> bool:
    return path_or_name.startswith(("/", ".", "~")) or path_or_name.endswith((".json", ".jsonl"))


def check_instruction_file(path: Path, required: Sequence[str] = ("instruction", "output")) -> int:
    """Checks a local instruction file before `datasets` parses it.

    Accepts a JSON array of objects (LLM-Adapters' files) or JSON lines. Each
    record needs the ``required`` fields as strings; ``input`` may be absent,
    null or a string.

    Returns:
        The number of records.

    Raises:
        ValueError: the file is empty, is not valid JSON (the message gives
            the line and column), holds no records, or a record lacks a
            required field or has a non-string one (the message gives its
            index and the fix).
    """
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{path} is empty; expected a JSON array of instruction records.")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        try:  # JSON lines
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            raise ValueError(
                f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); "
                "expected a JSON array of records or one JSON object per line."
            ) from None
    if isinstance(records, dict):
        records = [records]
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path} holds no records; expected a non-empty JSON array of objects.")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"{path}: record {i} is {type(record).__name__}, not a JSON object.")
        for field in required:
            if not isinstance(record.get(field), str):
                got = "missing" if field not in record else f"{record[field]!r}"
                raise ValueError(
                    f"{path}: record {i} has {field}={got}; every record needs {field!r} as a "
                    f"string (fields: {sorted(record)}). Fix or drop that record."
                )
        if record.get("input") is not None and not isinstance(record["input"], str):
            raise ValueError(f"{path}: record {i} has a non-string input {record['input']!r}.")
    return len(records)


def load_instruction_dataset(path_or_name: str, split: str = "train") -> datasets.Dataset:
    """Loads LLM-Adapters style records ``{"instruction", "input", "output", ...}``.

    Args:
      path_or_name: A local ``.json``/``.jsonl`` file (``split`` is then
        ignored), a local directory holding ``{split}.json``, or a Hugging Face
        hub dataset name such as ``"yahma/alpaca-cleaned"``. A string that
        starts with ``/``, ``.`` or ``~`` or ends with ``.json``/``.jsonl`` is
        always treated as a local path.
      split: The split to load: the file stem inside a directory, or the hub
        split.

    Returns:
      The dataset; it has at least the columns ``instruction`` and ``output``.

    Raises:
      FileNotFoundError: If a local path does not exist or a directory has no
        ``{split}.json``.
      ValueError: If a local file is empty or malformed, or the records
        lack ``instruction`` or ``output`` (see `check_instruction_file`).
    """
    path = Path(path_or_name).expanduser()
    if path.is_dir():
        data_file = path / f"{split}.json"
        if not data_file.is_file():
            found = sorted(p.name for p in path.glob("*.json")) or "no .json files"
            raise FileNotFoundError(
                f"{path} has no {split}.json for split={split!r}; expected a "
                f"directory with <split>.json files (found: {found})."
            )
        check_instruction_file(data_file)
        dataset = datasets.load_dataset("json", data_files=str(data_file), split="train")
    elif path.is_file():
        check_instruction_file(path)
        dataset = datasets.load_dataset("json", data_files=str(path), split="train")
    elif _looks_local(path_or_name):
        raise FileNotFoundError(
            f"{path} does not exist; expected a .json file of instruction records "
            f"or a directory holding {split}.json."
        )
    else:
        dataset = datasets.load_dataset(path_or_name, split=split)
    missing = {"instruction", "output"} - set(dataset.column_names)
    if missing:
        raise ValueError(
            f"{path_or_name} lacks the columns {sorted(missing)}; instruction "
            f"records need 'instruction' and 'output' (has {dataset.column_names})."
        )
    return dataset


def _tokenize(text: str, tokenizer: Any, cutoff_len: int, add_eos: bool) -> list[int]:
    """Tokenises ``text`` as LLM-Adapters does: truncate, then EOS if room."""
    input_ids = list(tokenizer(text, truncation=True, max_length=cutoff_len)["input_ids"])
    if add_eos and input_ids[-1] != tokenizer.eos_token_id and len(input_ids) < cutoff_len:
        input_ids.append(tokenizer.eos_token_id)
    return input_ids


def tokenize_for_causal_lm(
    example: Mapping[str, Any],
    tokenizer: Any,
    cutoff_len: int = 256,
    train_on_inputs: bool = True,
    add_eos: bool = True,
) -> dict[str, list[int]]:
    """Tokenises one instruction record for causal-LM fine-tuning.

    The text is ``alpaca_prompt(instruction, input) + output``, truncated to
    ``cutoff_len`` tokens, with EOS appended when it is not already last and
    the text is shorter than ``cutoff_len`` (LLM-Adapters ``finetune.py``).

    Args:
      example: A record with ``instruction``, ``output`` and optionally
        ``input``.
      tokenizer: A Hugging Face tokenizer (callable, with ``eos_token_id``).
      cutoff_len: Maximum number of tokens L.
      train_on_inputs: If False, the prompt tokens get label ``IGNORE_INDEX``.
      add_eos: Whether to append the EOS token.

    Returns:
      ``input_ids``, ``attention_mask`` and ``labels``, lists of the same
      length T <= L; labels are unshifted (label t is the token at t).

    Raises:
      ValueError: If ``cutoff_len`` is not positive, or ``add_eos`` is set and
        the tokenizer has no EOS token.
    """
    if cutoff_len <= 0:
        raise ValueError(f"cutoff_len must be positive, got {cutoff_len}.")
    if add_eos and tokenizer.eos_token_id is None:
        raise ValueError(
            f"{type(tokenizer).__name__} has no eos_token; set tokenizer.eos_token "
            "or pass add_eos=False."
        )
    prompt = alpaca_prompt(example["instruction"], example.get("input") or "")
    input_ids = _tokenize(prompt + example["output"], tokenizer, cutoff_len, add_eos)
    labels = list(input_ids)
    if not train_on_inputs:
        prompt_len = len(_tokenize(prompt, tokenizer, cutoff_len, add_eos=False))
        masked = min(prompt_len, len(labels))
        labels[:masked] = [IGNORE_INDEX] * masked
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": labels,
    }


def pad_batch(
    examples: Sequence[Mapping[str, Sequence[int]]], seq_len: int, pad_id: int
) -> dict[str, np.ndarray]:
    """Right-pads tokenised examples into fixed-shape arrays for a jitted step.

    Args:
      examples: B records with ``input_ids`` and ``labels`` (as returned by
        `tokenize_for_causal_lm`), each at most ``seq_len`` tokens long.
      seq_len: The fixed sequence length S.
      pad_id: Token id written into padding.

    Returns:
      A dict of (B, S) arrays: ``input_ids`` (int32), ``attention_mask``
      (int32, 1 on real tokens), ``labels`` (int32, unshifted targets with
      ``pad_id`` wherever no loss is taken, so they index safely) and
      ``loss_mask`` (float32, 1.0 where the label counts). A causal-LM step
      predicts ``labels[:, 1:]`` from ``logits[:, :-1]`` weighted by
      ``loss_mask[:, 1:]``.

    Raises:
      ValueError: If an example is longer than ``seq_len``.
    """
    batch = len(examples)
    input_ids = np.full((batch, seq_len), pad_id, dtype=np.int32)
    attention_mask = np.zeros((batch, seq_len), dtype=np.int32)
    labels = np.full((batch, seq_len), IGNORE_INDEX, dtype=np.int32)
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        if length > seq_len:
            raise ValueError(
                f"example {row} of the batch has {length} tokens > seq_len={seq_len}; "
                "tokenize with cutoff_len <= seq_len."
            )
        input_ids[row, :length] = example["input_ids"]
        attention_mask[row, :length] = 1
        labels[row, :length] = example["labels"]
    loss_mask = labels != IGNORE_INDEX
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": np.where(loss_mask, labels, pad_id).astype(np.int32),
        "loss_mask": loss_mask.astype(np.float32),
    }


@functools.lru_cache(maxsize=2)
def _epoch_order(num_examples: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(num_examples)
    return np.random.default_rng((seed, epoch)).permutation(num_examples)


def length_grouped_order(
    lengths: np.ndarray, seed: int, epoch: int, batch_size: int, megabatch: int = 50
) -> np.ndarray:
    """One epoch's order with examples of similar length batched together.

    As Hugging Face's ``group_by_length``: a random permutation (drawn from
    ``numpy.random.default_rng((seed, epoch))``) is cut into mega-batches of
    ``megabatch * batch_size`` examples, each sorted by length; the full
    batches of ``batch_size`` are then put in random order, and the remainder
    (fewer than ``batch_size`` examples) goes last. With `trim_padding` most
    batches then run at a short length bucket.

    Args:
      lengths: (N,) token counts.
      seed: Non-negative shuffling seed.
      epoch: Epoch index.
      batch_size: B.
      megabatch: Batches per sorted group.

    Returns:
      (N,) a permutation of ``range(N)``.
    """
    if batch_size < 1 or megabatch < 1:
        raise ValueError(
            f"batch_size and megabatch must be ≥ 1, got batch_size={batch_size}, "
            f"megabatch={megabatch}."
        )
    lengths = np.asarray(lengths)
    rng = np.random.default_rng((seed, epoch))
    perm = rng.permutation(len(lengths))
    size = batch_size * megabatch
    groups = [
        chunk[np.argsort(-lengths[chunk], kind="stable")]
        for chunk in np.split(perm, np.arange(size, len(perm), size))
    ]
    order = np.concatenate(groups)
    full = len(order) // batch_size
    batches = order[: full * batch_size].reshape(full, batch_size)[rng.permutation(full)]
    return np.concatenate([batches.reshape(-1), order[full * batch_size :]])


def stream_indices(
    num_examples: int,
    seed: int,
    start: int,
    count: int,
    shuffle: bool = True,
    order: Callable[[int], np.ndarray] | None = None,
) -> np.ndarray:
    """Dataset indices at positions ``start, ..., start + count - 1`` of the stream.

    The stream visits every example once per epoch; epoch e uses the
    permutation drawn from ``numpy.random.default_rng((seed, e))``, so a
    position determines its example without replaying earlier ones.

    Args:
      num_examples: Dataset size N > 0.
      seed: Non-negative shuffling seed.
      start: First stream position (examples consumed so far), >= 0.
      count: Number of positions.
      shuffle: If False every epoch is ``0, ..., N - 1`` in order.
      order: epoch → permutation of ``range(N)``, replacing the default
        shuffle (e.g. a `length_grouped_order` partial).

    Returns:
      (count,) int64 dataset indices.
    """
    if num_examples <= 0:
        raise ValueError(f"cannot draw from an empty dataset (num_examples={num_examples}).")
    if start < 0:
        raise ValueError(f"start must be a non-negative data position, got {start}.")
    if count < 0:
        raise ValueError(f"count must be ≥ 0 positions, got {count}.")
    epochs, offsets = np.divmod(np.arange(start, start + count), num_examples)
    indices = np.empty(count, dtype=np.int64)
    for epoch in np.unique(epochs):
        in_epoch = epochs == epoch
        perm = order(int(epoch)) if order else _epoch_order(num_examples, seed, int(epoch), shuffle)
        indices[in_epoch] = perm[offsets[in_epoch]]
    return indices


def iterate_batches(
    examples: Sequence[Mapping[str, Sequence[int]]],
    batch_size: int,
    seq_len: int,
    pad_id: int,
    seed: int,
    start: int = 0,
    shuffle: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields fixed-shape training batches forever, resumable at any position.

    Batch k covers stream positions ``start + k * batch_size`` onwards (see
    `stream_indices`); batches run across epoch boundaries, so every batch is
    full. To resume, pass ``start`` = number of examples consumed so far: the
    result equals the continuation of the original run.

    Args:
      examples: N tokenised records (a list or a `datasets.Dataset`).
      batch_size: B.
      seq_len: S, see `pad_batch`.
      pad_id: Padding token id.
      seed: Shuffling seed.
      start: Stream position of the first example.
      shuffle: Whether to shuffle each epoch.

    Yields:
      `pad_batch` dicts of (B, S) arrays.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    if seq_len <= 0:
        raise ValueError(f"seq_len must be at least 1 token, got {seq_len}.")
    position = start
    while True:
        indices = stream_indices(len(examples), seed, position, batch_size, shuffle)
        yield pad_batch([examples[int(i)] for i in indices], seq_len, pad_id)
        position += batch_size


def _local_dir(path_or_dir: str | os.PathLike | None, subdir: str) -> Path | None:
    """The directory holding a dataset's files, or None to use the hub."""
    root = Path(path_or_dir).expanduser() if path_or_dir is not None else default_data_dir()
    if root is None:
        return None
    nested = root / subdir
    return nested if nested.is_dir() else root


def _require_file(directory: Path, name: str, what: str) -> Path:
    path = directory / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist; expected {what}. Pass the directory holding it, "
            f"or set {DATA_ENV_VAR} to the shared data root."
        )
    return path


def _check_split(split: str, aliases: Mapping[str, str], dataset: str) -> str:
    if split not in aliases:
        raise ValueError(f"unknown {dataset} split {split!r}; use one of {sorted(aliases)}.")
    return aliases[split]


def load_sst2(
    path_or_dir: str | os.PathLike | None = None, split: str = "train"
) -> datasets.Dataset:
    """Loads GLUE SST-2 as columns ``text`` (str) and ``label`` (1 = positive).

    Args:
      path_or_dir: A directory holding ``train.tsv``/``dev.tsv``, or a data root
        holding ``glue_sst2/``. None uses `default_data_dir`, and the hub's
        ``glue``/``sst2`` when that is None.
      split: ``"train"``, or ``"dev"`` / ``"validation"`` (872 rows).

    Returns:
      The dataset.
    """
    local_split = _check_split(
        split, {"train": "train", "dev": "dev", "validation": "dev"}, "SST-2"
    )
    directory = _local_dir(path_or_dir, "glue_sst2")
    if directory is None:
        hub_split = "validation" if local_split == "dev" else "train"
        dataset = datasets.load_dataset("glue", "sst2", split=hub_split)
    else:
        dataset = datasets.load_dataset(
            "csv",
            data_files=str(_require_file(directory, f"{local_split}.tsv", "the GLUE SST-2 TSV")),
            delimiter="\t",
            quoting=csv.QUOTE_NONE,
            keep_default_na=False,
            split="train",
        )
    return dataset.select_columns(["sentence", "label"]).rename_column("sentence", "text")


def _boolq_record(record: Mapping[str, str]) -> dict[str, Any]:
    match = _BOOLQ_INSTRUCTION.fullmatch(record["instruction"])
    if match is None or record["answer"] not in ("true", "false"):
        raise ValueError(
            "not an LLM-Adapters BoolQ record (expected 'Please answer the following "
            "question with true or false, question: ...' and answer true/false): "
            f"{dict(record)!r}"
        )
    return {"text": match["question"], "label": int(record["answer"] == "true")}


def _boolq_hub_record(record: Mapping[str, Any]) -> dict[str, Any]:
    return {"text": record["question"] + "?", "label": int(record["answer"])}


def load_boolq(
    path_or_dir: str | os.PathLike | None = None, split: str = "train"
) -> datasets.Dataset:
    """Loads BoolQ for classification as columns ``text`` and ``label`` (1 = true).

    The LLM-Adapters files carry only the question (no passage), embedded as
    ``"Please answer the following question with true or false, question:
    {question}\\n\\nAnswer format: true/false"``; ``text`` is that question.
    The hub fallback (``google/boolq``) drops the passage too, to match.

    Args:
      path_or_dir: A directory holding ``train.json``/``test.json``, or a data
        root holding ``llm_adapters/commonsense/boolq/``. None uses
        `default_data_dir`, and the hub when that is None.
      split: ``"train"`` (9427 rows), or ``"test"`` / ``"validation"`` (3270).

    Returns:
      The dataset.
    """
    local_split = _check_split(
        split, {"train": "train", "test": "test", "validation": "test"}, "BoolQ"
    )
    directory = _local_dir(path_or_dir, "llm_adapters/commonsense/boolq")
    if directory is None:
        hub_split = "validation" if local_split == "test" else "train"
        dataset = datasets.load_dataset("google/boolq", split=hub_split)
        parse = _boolq_hub_record
    else:
        dataset = load_instruction_dataset(
            str(_require_file(directory, f"{local_split}.json", "the LLM-Adapters BoolQ JSON"))
        )
        parse = _boolq_record
    # Built in memory: a cached `Dataset.map` can outlive edits to `parse`.
    return datasets.Dataset.from_list([parse(record) for record in dataset])


def tokenize_classification(
    dataset: datasets.Dataset | Mapping[str, Sequence[Any]],
    tokenizer: Any,
    max_len: int,
    text_column: str = "text",
    label_column: str = "label",
) -> dict[str, np.ndarray]:
    """Tokenises a text-classification dataset into fixed-length arrays.

    Args:
      dataset: N rows with a text and an integer label column.
      tokenizer: A Hugging Face tokenizer with a pad token.
      max_len: Sequence length L; longer texts are truncated.
      text_column: Name of the text column.
      label_column: Name of the label column.

    Returns:
      ``input_ids``, ``attention_mask`` and ``token_type_ids`` as (N, L) int32
      (token types are zero when the tokenizer does not produce them) and
      ``labels`` as (N,) int32.

    Raises:
      ValueError: If the tokenizer has no pad token.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be at least 1 token, got max_len={max_len}.")
    if tokenizer.pad_token_id is None:
        raise ValueError(
            f"{type(tokenizer).__name__} has no pad_token; set tokenizer.pad_token first."
        )
    encoded = tokenizer(
        list(dataset[text_column]),
        padding="max_length",
        truncation=True,
        max_length=max_len,
        return_tensors="np",
    )
    input_ids = encoded["input_ids"].astype(np.int32)
    token_type_ids = encoded.get("token_type_ids", np.zeros_like(input_ids))
    return {
        "input_ids": input_ids,
        "attention_mask": encoded["attention_mask"].astype(np.int32),
        "token_type_ids": np.asarray(token_type_ids, dtype=np.int32),
        "labels": np.asarray(dataset[label_column], dtype=np.int32),
    }


def trim_padding(batch: Mapping[str, np.ndarray], multiple: int = 16) -> dict[str, np.ndarray]:
    """Cuts right padding off a batch, to a length bucket.

    Every (B, L) array is cut to L' = the smallest multiple of ``multiple``
    that holds the longest row of ``attention_mask`` (at most L); other arrays
    pass through. A jitted step then compiles once per bucket (at most
    L / multiple shapes) instead of computing every short batch at the full L.
    For right-padded encoders the cut columns are masked keys, so the outputs
    at the kept positions are unchanged.

    Args:
      batch: arrays with ``attention_mask`` (B, L), right-padded.
      multiple: bucket width in tokens.

    Returns:
      The batch with (B, L') sequence arrays.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be a positive number of tokens, got {multiple}.")
    mask = np.asarray(batch["attention_mask"])
    length = mask.shape[1]
    longest = int(mask.sum(1).max(initial=0))
    keep = min(length, max(multiple, -(-longest // multiple) * multiple))
    return {
        k: v[:, :keep] if np.ndim(v) == 2 and np.shape(v)[1] == length else v
        for k, v in batch.items()
    }
