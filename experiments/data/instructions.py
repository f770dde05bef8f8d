"""LLM-Adapters instruction data: the Alpaca prompt, instruction files, causal-LM tokens.

Instruction tuning follows LLM-Adapters (Hu et al., EMNLP 2023,
https://github.com/AGI-Edgerunners/LLM-Adapters): the training text is the
Alpaca prompt + output + EOS, cut at ``cutoff_len`` tokens, and by default the
loss covers the prompt too. See ``../shared/docs/EVAL_PROTOCOL.md``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets

from experiments.data.batching import IGNORE_INDEX

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
