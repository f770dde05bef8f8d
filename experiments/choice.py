"""Multiple-choice questions scored by option likelihood (the lm-evaluation-harness way).

The LLM-Adapters protocol (`experiments.scoring`) asks the model to write a
label ("answer3") and reads it from the generated text. A ~100M model cannot
bind a label to the third option, so it scores at chance even when it knows
the answer. Here the model is never asked to write a label: each option's
*text* is scored as a continuation of

    Question: {question}
    Answer: {option}

by the sum of its tokens' log-probabilities, and the best-scoring option is
the prediction (``acc``); ``acc_norm`` divides each sum by the option's length
in characters first, as lm-evaluation-harness does for ARC. The options are
parsed from the LLM-Adapters instruction (``Answer1: … Answer2: …``,
``Solution1:``, ``Option1:``; BoolQ's are "true" and "false"), so every
LLM-Adapters test file can be scored both ways.

`option_example` is the matching training format: the same prompt followed by
the correct option's text and EOS, with the loss on the answer only.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import genlora_jax as gl
from experiments import data as data_lib

_INSTRUCTION = re.compile(
    r"Please (?:choose|answer)[^:]*?: ?(?P<question>.*?)\n\n(?P<options>.*?)\s*"
    r"Answer format: (?P<format>\S+)\s*$",
    re.DOTALL,
)
_BOOLQ = re.compile(
    r"Please answer the following question with true or false, question: (?P<question>.*?)"
    r"\n\nAnswer format: true/false\s*$",
    re.DOTALL,
)
_OPTION = re.compile(r"(?:^|\s)(?:Answer|Solution|Option|Ending)(?P<index>\d+): ")
LENGTH_BUCKET = 32
"""Scored sequences are right-padded to a multiple of this many tokens."""


@dataclasses.dataclass(frozen=True)
class Choice:
    """One multiple-choice question.

    Attributes:
        question: the question text.
        options: the K option texts, in label order.
        answer: index of the correct option (-1 when the record has no answer).
    """

    question: str
    options: tuple[str, ...]
    answer: int


def parse_choice(record: Mapping[str, Any]) -> Choice:
    """The question, options and answer of an LLM-Adapters multiple-choice record.

    Raises:
        ValueError: the instruction is not a multiple-choice one (math), or
            its options do not match its answer format; the message shows it.
    """
    instruction = record["instruction"]
    answer = record.get("answer")
    if match := _BOOLQ.fullmatch(instruction):
        options = ("true", "false")
        return Choice(match["question"], options, options.index(answer) if answer else -1)
    match = _INSTRUCTION.fullmatch(instruction)
    if match is None:
        raise ValueError(
            "not an LLM-Adapters multiple-choice instruction ('Please choose ... : question"
            f"\\n\\nAnswer1: ... Answer format: answer1/...'): {instruction[:200]!r}"
        )
    labels = match["format"].split("/")
    block = match["options"]
    starts = list(_OPTION.finditer(block))
    texts = [
        block[m.end() : (starts[i + 1].start() if i + 1 < len(starts) else len(block))].strip()
        for i, m in enumerate(starts)
    ]
    indices = [int(m["index"]) for m in starts]
    if indices != list(range(1, len(labels) + 1)) or not all(texts):
        raise ValueError(
            f"options {indices} do not match the answer format {labels}: {instruction[:300]!r}"
        )
    return Choice(match["question"].strip(), tuple(texts), labels.index(answer) if answer else -1)


def prompt(question: str) -> str:
    """``"Question: {question}\\nAnswer:"``; an option follows after a space."""
    return f"Question: {question}\nAnswer:"


def option_example(
    record: Mapping[str, Any], tokenizer: Any, cutoff_len: int = 256
) -> dict[str, list[int]]:
    """A training example: the prompt, the correct option's text, EOS; loss on the answer.

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels`` (prompt tokens are
        ``IGNORE_INDEX``), at most ``cutoff_len`` tokens (the prompt is cut
        from the left if needed), as `experiments.data.pad_batch` takes them.
    """
    choice = parse_choice(record)
    context = _ids(tokenizer, prompt(choice.question))
    answer = _ids(tokenizer, " " + choice.options[choice.answer], special=False)
    answer = [*answer, tokenizer.eos_token_id][:cutoff_len]
    context = context[max(0, len(context) + len(answer) - cutoff_len) :]
    return {
        "input_ids": context + answer,
        "attention_mask": [1] * (len(context) + len(answer)),
        "labels": [data_lib.IGNORE_INDEX] * len(context) + answer,
    }


def _ids(tokenizer: Any, text: str, special: bool = True) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


@functools.lru_cache(maxsize=4)
def _scorer(model, intercept: bool):
    """Jitted ``(params, ids (R, L), mask (R, L), target (R, L)) -> (R,)`` sums of
    log p(token) over the positions ``target`` marks (the option's tokens)."""

    def score(params, ids, mask, target):
        with gl.adapted(enabled=intercept):
            logits = model(ids, attention_mask=mask, params=params).logits
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        token = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        return jnp.sum(token * target[:, 1:], axis=-1)

    return jax.jit(score)


@dataclasses.dataclass
class ChoiceScores:
    """Option-likelihood results on one task.

    Attributes:
        acc: fraction right by the summed log-likelihood.
        acc_norm: fraction right by log-likelihood per character.
        n: questions scored.
        chance: expected accuracy of a uniform guess (mean of 1/K).
        predictions: per question, (index by acc, index by acc_norm).
        tokens_per_second: scored tokens (padding excluded) per second,
            compilation included.
    """

    acc: float
    acc_norm: float
    n: int
    chance: float
    predictions: list[tuple[int, int]]
    tokens_per_second: float

    def stderr(self, value: float) -> float:
        """Binomial standard error sqrt(p(1 − p)/n) of an accuracy over ``n`` questions."""
        return math.sqrt(value * (1 - value) / self.n) if self.n else float("nan")


def score_choices(
    model,
    params: Mapping,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    *,
    questions_per_batch: int = 8,
    max_len: int = 256,
    desc: str | None = None,
) -> ChoiceScores:
    """Option-likelihood accuracy of the (adapted) model on multiple-choice records.

    All options of ``questions_per_batch`` questions go through one jitted
    forward of shape (questions_per_batch · K_max, L), L a multiple of
    `LENGTH_BUCKET`, so a whole test set compiles a handful of times.

    Args:
        model: a `transformers` Flax causal LM.
        params: its wrapped params (merged first when every adapter merges)
            or plain params.
        tokenizer: its tokenizer.
        records: LLM-Adapters records (see `parse_choice`).
        questions_per_batch: questions per forward.
        max_len: longest scored sequence; longer prompts are cut from the left.
        desc: progress-bar label (None: no bar).

    Returns:
        The `ChoiceScores`.
    """
    choices = [parse_choice(r) for r in records]
    if any(c.answer < 0 for c in choices):
        raise ValueError("every record needs its 'answer' to be scored.")
    k_max = max(len(c.options) for c in choices)
    tree, intercept = gl.inference_params(params)
    scorer = _scorer(model, intercept)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = questions_per_batch * k_max
    predictions: list[tuple[int, int]] = []
    scored_tokens, start = 0, time.perf_counter()
    batches = range(0, len(choices), questions_per_batch)
    for first in tqdm(batches, desc=desc, disable=desc is None, dynamic_ncols=True):
        group = choices[first : first + questions_per_batch]
        seqs, spans = [], []
        for choice in group:
            context = _ids(tokenizer, prompt(choice.question))
            for option in choice.options:
                cont = _ids(tokenizer, " " + option, special=False)[:max_len]
                ctx = context[max(0, len(context) + len(cont) - max_len) :]
                seqs.append(ctx + cont)
                spans.append((len(ctx), len(ctx) + len(cont)))
        length = -(-max(map(len, seqs)) // LENGTH_BUCKET) * LENGTH_BUCKET
        ids = np.full((rows, length), pad, np.int32)
        mask = np.zeros((rows, length), np.int32)
        target = np.zeros((rows, length), np.float32)
        for row, (seq, (lo, hi)) in enumerate(zip(seqs, spans, strict=True)):
            ids[row, : len(seq)], mask[row, : len(seq)], target[row, lo:hi] = seq, 1, 1.0
        sums = np.asarray(scorer(tree, ids, mask, target))
        scored_tokens += int(mask.sum())
        row = 0
        for choice in group:
            k = len(choice.options)
            logp = sums[row : row + k]
            per_char = logp / np.array([max(len(o), 1) for o in choice.options])
            predictions.append((int(np.argmax(logp)), int(np.argmax(per_char))))
            row += k
    seconds = time.perf_counter() - start
    n = len(choices)
    return ChoiceScores(
        acc=sum(p[0] == c.answer for p, c in zip(predictions, choices, strict=True)) / n,
        acc_norm=sum(p[1] == c.answer for p, c in zip(predictions, choices, strict=True)) / n,
        n=n,
        chance=float(np.mean([1 / len(c.options) for c in choices])),
        predictions=predictions,
        tokens_per_second=scored_tokens / seconds,
    )
