"""Sentence classification data: GLUE SST-2 and BoolQ (questions only), as fixed-length arrays.

Local copies are read from the data root (`experiments.data.paths`): SST-2
from ``glue_sst2/{train,dev}.tsv``, BoolQ from LLM-Adapters'
``llm_adapters/commonsense/boolq/{train,test}.json``; the hubs are used only
when no local copy is configured.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from experiments.data.instructions import load_instruction_dataset
from experiments.data.paths import DATA_ENV_VAR, default_data_dir

_BOOLQ_INSTRUCTION = re.compile(
    r"Please answer the following question with true or false, "
    r"question: (?P<question>.*)\n\nAnswer format: true/false",
    re.DOTALL,
)


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


@dataclasses.dataclass(frozen=True)
class _Source:
    """A dataset's name, its folder under the data root, and split aliases."""

    name: str
    subdir: str
    splits: Mapping[str, str]


_SST2 = _Source("SST-2", "glue_sst2", {"train": "train", "dev": "dev", "validation": "dev"})
_BOOLQ = _Source(
    "BoolQ",
    "llm_adapters/commonsense/boolq",
    {"train": "train", "test": "test", "validation": "test"},
)


def _locate(
    path_or_dir: str | os.PathLike | None, split: str, source: _Source
) -> tuple[str, Path | None, str]:
    """(local split name, local directory or None for the hub, hub split name)."""
    if split not in source.splits:
        raise ValueError(
            f"unknown {source.name} split {split!r}; use one of {sorted(source.splits)}."
        )
    local_split = source.splits[split]
    hub_split = "train" if local_split == "train" else "validation"
    return local_split, _local_dir(path_or_dir, source.subdir), hub_split


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
    local_split, directory, hub_split = _locate(path_or_dir, split, _SST2)
    if directory is None:
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
    local_split, directory, hub_split = _locate(path_or_dir, split, _BOOLQ)
    if directory is None:
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
