"""Answer extraction and accuracy, exactly as in the LLM-Adapters evaluation.

Hu et al., "LLM-Adapters", EMNLP 2023 (``evaluate.py`` and
``commonsense_evaluate.py`` of https://github.com/AGI-Edgerunners/LLM-Adapters);
the protocol is written down in ``../shared/docs/EVAL_PROTOCOL.md``:

- numeric tasks: drop commas, take the LAST match of ``-?\\d+\\.?\\d*``,
  correct if ``|float(answer) - prediction| <= 0.001``;
- AQuA: the FIRST capital letter A-E of the response, compared exactly;
- commonsense: the FIRST match of the task's label set, compared exactly.

Matching is case-sensitive, as in the original scripts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

RESPONSE_MARKER = "### Response:"
NUMERIC_TOLERANCE = 0.001

NUMERIC = "numeric"
LETTER = "letter"
LABEL = "label"

_NUMBER = re.compile(r"-?\d+\.?\d*")
_LETTER = re.compile(r"[A-E]")

_NUMERIC_TASKS = ("AddSub", "MultiArith", "SingleEq", "SVAMP", "gsm8k", "mawps")
_ANSWER_LABELS = tuple(f"answer{i}" for i in range(1, 6))
TASK_LABELS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "boolq": ("true", "false"),
        "piqa": ("solution1", "solution2"),
        "social_i_qa": _ANSWER_LABELS,
        "hellaswag": tuple(f"ending{i}" for i in range(1, 5)),
        "winogrande": ("option1", "option2"),
        "ARC-Challenge": _ANSWER_LABELS,
        "ARC-Easy": _ANSWER_LABELS,
        "openbookqa": _ANSWER_LABELS,
    }
)
"""Label set searched in the response of each commonsense task."""

TASK_KINDS: Mapping[str, str] = MappingProxyType(
    {
        **dict.fromkeys(_NUMERIC_TASKS, NUMERIC),
        "AQuA": LETTER,
        **dict.fromkeys(TASK_LABELS, LABEL),
    }
)
"""Scoring kind (``numeric``, ``letter`` or ``label``) of each known task."""

_CANONICAL = {name.lower(): name for name in TASK_KINDS}
_LABEL_PATTERNS = {
    task: re.compile("|".join(map(re.escape, labels))) for task, labels in TASK_LABELS.items()
}


def canonical_task(task: str) -> str:
    """Returns the registry spelling of ``task`` (matched case-insensitively).

    Raises:
      KeyError: If the task is unknown; the message lists the known tasks.
    """
    try:
        return _CANONICAL[task.lower()]
    except KeyError:
        raise KeyError(
            f"unknown task {task!r}; known tasks are: {', '.join(TASK_KINDS)}."
        ) from None


def extract_response(generated_text: str) -> str:
    """Returns the model's response: the text after ``### Response:``, stripped.

    As in LLM-Adapters (``output.split("### Response:")[1].strip()``), a
    response that itself contains the marker is cut at it. Text without the
    marker is taken to be the response already, so the function is idempotent.
    """
    parts = generated_text.split(RESPONSE_MARKER)
    return (parts[1] if len(parts) > 1 else parts[0]).strip()


def extract_answer(task: str, response: str) -> float | str:
    """Extracts the predicted answer from a response.

    Args:
      task: A task name of `TASK_KINDS`.
      response: The model's response (see `extract_response`).

    Returns:
      For numeric tasks the LAST number after dropping commas (``inf`` if
      none); for AQuA the FIRST capital letter A-E; for commonsense tasks the
      FIRST match of the task's label set; ``""`` when nothing matches.
    """
    task = canonical_task(task)
    kind = TASK_KINDS[task]
    if kind == NUMERIC:
        numbers = _NUMBER.findall(response.replace(",", ""))
        return float(numbers[-1]) if numbers else math.inf
    pattern = _LETTER if kind == LETTER else _LABEL_PATTERNS[task]
    match = pattern.search(response.strip())
    return match.group(0) if match else ""


def is_correct(task: str, response: str, answer: str | float) -> bool:
    """Whether ``response`` answers ``answer`` correctly under the protocol.

    Raises:
      ValueError: If a numeric task's ``answer`` is not a number.
    """
    predicted = extract_answer(task, response)
    if isinstance(predicted, float):
        try:
            target = float(answer)
        except ValueError:
            raise ValueError(
                f"{canonical_task(task)} answers must be numbers, got {answer!r}."
            ) from None
        return abs(target - predicted) <= NUMERIC_TOLERANCE
    return predicted == answer


def score_task(
    task: str, predictions: Sequence[str], records: Sequence[Mapping[str, Any]]
) -> float:
    """Accuracy of ``predictions`` against the ``answer`` of each record.

    Args:
      task: A task name of `TASK_KINDS`.
      predictions: N generated texts: full decodes (prompt included) or
        responses; each is passed through `extract_response`.
      records: N records with an ``answer`` field, in the same order.

    Returns:
      The fraction of correct predictions, in [0, 1].

    Raises:
      ValueError: If the lengths differ or there are no predictions.
    """
    if len(predictions) != len(records):
        raise ValueError(f"{task}: {len(predictions)} predictions for {len(records)} records.")
    if not records:
        raise ValueError(f"{task}: cannot score an empty set of predictions.")
    correct = sum(
        is_correct(task, extract_response(prediction), record["answer"])
        for prediction, record in zip(predictions, records, strict=True)
    )
    return correct / len(records)


def summarize(accuracies: Mapping[str, float]) -> dict[str, float]:
    """Per-task accuracies plus their unweighted mean under key ``"average"``.

    >>> summarize({"boolq": 0.5, "piqa": 1.0})
    {'boolq': 0.5, 'piqa': 1.0, 'average': 0.75}

    Raises:
      ValueError: If ``accuracies`` is empty or already has ``"average"``.
    """
    if not accuracies:
        raise ValueError("summarize needs at least one task accuracy.")
    if "average" in accuracies:
        raise ValueError("'average' is reserved for the mean; rename that task.")
    return {**accuracies, "average": sum(accuracies.values()) / len(accuracies)}
