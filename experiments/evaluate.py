"""Scoring a model and its params on test sets: one entry point per kind of task.

`score_tasks` scores a causal LM on LLM-Adapters test sets (loaded by
`load_tasks`) with a scoring mode of `SCORING_MODES`:

- ``likelihood``: each option's text ranked by its log-likelihood after
  "Question: …\\nAnswer:" (`experiments.choice`), ``acc`` and
  length-normalised ``acc_norm``;
- ``generate``: the paper's LLM-Adapters protocol, the Alpaca prompt decoded
  (`experiments.generate`) and the answer read from the reply
  (`experiments.scoring`);
- ``both``.

The params are merged once for every task and mode when every adapter merges
(`genlora_jax.inference_params`), else served through the interceptor.
`ClassificationAccuracy` is the same job for a sequence classifier.
`experiments.finetune` and `experiments.llm` score through here.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import genlora_jax as gl
from experiments import choice, scoring
from experiments import data as data_lib
from experiments.data import alpaca_prompt
from experiments.generate import generate

SCORING_MODES = ("likelihood", "generate", "both")
"""Values of ``--scoring``: option likelihood, the generative protocol, or both."""


@dataclasses.dataclass
class TaskScores:
    """One test set's scores under `score_tasks`.

    Attributes:
        n: questions scored.
        likelihood: option-likelihood scores (``likelihood``, ``both``).
        likelihood_seconds: their wall time, compilation included.
        protocol_acc: accuracy by the generative protocol (``generate``, ``both``).
        responses: the scored responses, the text after ``### Response:``
            as `experiments.scoring` reads it, in record order.
        generate_seconds: wall time of decoding and reading the answers.
        generated_tokens: tokens of ``responses`` (EOS excluded).
    """

    n: int
    likelihood: choice.ChoiceScores | None = None
    likelihood_seconds: float | None = None
    protocol_acc: float | None = None
    responses: list[str] | None = None
    generate_seconds: float | None = None
    generated_tokens: int | None = None

    def likelihood_metrics(self) -> dict[str, float]:
        """``acc``, ``acc_norm``, their binomial standard errors and ``chance``
        ({} when the task was not scored by likelihood)."""
        s = self.likelihood
        if s is None:
            return {}
        return {
            "acc": s.acc,
            "acc_se": s.stderr(s.acc),
            "acc_norm": s.acc_norm,
            "acc_norm_se": s.stderr(s.acc_norm),
            "chance": s.chance,
        }

    def metrics(self) -> dict[str, float]:
        """The flat result row: `likelihood_metrics` with throughput, then
        ``protocol_acc`` with its standard error and throughput."""
        out: dict[str, float] = self.likelihood_metrics()
        if self.likelihood is not None:
            out.update(
                scored_tokens_per_s=round(self.likelihood.tokens_per_second, 1),
                likelihood_seconds=round(self.likelihood_seconds, 1),
            )
        if self.protocol_acc is not None:
            acc, seconds = self.protocol_acc, self.generate_seconds
            out.update(
                protocol_acc=acc,
                protocol_acc_se=math.sqrt(acc * (1 - acc) / self.n),
                generate_seconds=round(seconds, 1),
                generated_tokens_per_s=round(self.generated_tokens / seconds, 1),
            )
        return out


def score_tasks(
    model,
    params: Mapping,
    tokenizer: Any,
    tasks: Mapping[str, Sequence[Mapping[str, Any]]],
    mode: str,
    *,
    max_new_tokens: int,
    num_beams: int = 1,
    batch_size: int = 8,
) -> dict[str, TaskScores]:
    """Scores of ``params`` on each task, by option likelihood, the protocol, or both.

    Args:
        model: a `transformers` Flax causal LM.
        params: its wrapped (or plain) params; merged once for all tasks.
        tokenizer: the model's tokenizer.
        tasks: task name → LLM-Adapters records (``instruction``, optional
            ``input``, ``answer``); generative scoring needs a name of
            `experiments.scoring.TASK_KINDS` (any spelling).
        mode: one of `SCORING_MODES`.
        max_new_tokens: generation budget (protocol: 256 for math, 32 for
            commonsense).
        num_beams: 1 for greedy; the protocol uses 4.
        batch_size: prompts per generation call.

    Returns:
        Task → its `TaskScores`.
    """
    if mode not in SCORING_MODES:
        raise ValueError(f"scoring mode {mode!r}; use one of {SCORING_MODES}.")
    tree, _ = gl.inference_params(params)
    out = {}
    for task, records in tasks.items():
        scores = out[task] = TaskScores(n=len(records))
        if mode in ("likelihood", "both"):
            start = time.perf_counter()
            scores.likelihood = choice.score_choices(
                model, tree, tokenizer, list(records), desc=f"{task} likelihood"
            )
            scores.likelihood_seconds = time.perf_counter() - start
        if mode in ("generate", "both"):
            start = time.perf_counter()
            prompts = [alpaca_prompt(r["instruction"], r.get("input") or "") for r in records]
            replies = generate(
                model,
                tree,
                tokenizer,
                prompts,
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                batch_size=batch_size,
                desc=task,
            )
            full = [prompt + reply for prompt, reply in zip(prompts, replies, strict=True)]
            scores.protocol_acc = scoring.score_task(scoring.canonical_task(task), full, records)
            scores.responses = [scoring.extract_response(text) for text in full]
            scores.generate_seconds = time.perf_counter() - start
            scores.generated_tokens = sum(
                len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in scores.responses
            )
    return out


def accuracies(scores: Mapping[str, TaskScores]) -> dict[str, float]:
    """Task → accuracy, and their unweighted ``average``: the protocol's where
    the tasks were generated, else option likelihood's ``acc``."""
    return scoring.summarize(
        {
            task: s.protocol_acc if s.protocol_acc is not None else s.likelihood.acc
            for task, s in scores.items()
        }
    )


def load_tasks(
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


class ClassificationAccuracy:
    """Accuracy of a sequence classifier (`experiments.classify`) on the
    fixed-length arrays of `experiments.data.tokenize_classification`: the
    merged model when every adapter merges (no interceptor at inference), else
    the interceptor (AuroRA); the choice is `genlora_jax.inference_params`.

    The jitted forwards are built once per model, so runs of one invocation
    share their compilation.
    """

    def __init__(self, model, batch_size: int = 128):
        self.model, self.batch_size = model, batch_size

        def predict(tree, *cols, intercept: bool):
            with gl.adapted(enabled=intercept):
                return jnp.argmax(model(*cols, params=tree).logits, -1)

        self._predict = jax.jit(predict, static_argnames="intercept")

    def __call__(self, params, arrays) -> float:
        """Fraction of ``arrays["labels"]`` predicted; padded to full batches."""
        tree, intercept = gl.inference_params(params)
        n, bs, correct = len(arrays["labels"]), self.batch_size, 0
        for i in range(0, n, bs):
            sl = slice(i, i + bs)
            pad = bs - len(arrays["labels"][sl])
            cols = [
                np.pad(arrays[k][sl], ((0, pad), (0, 0)))
                for k in ("input_ids", "attention_mask", "token_type_ids")
            ]
            pred = np.asarray(self._predict(tree, *cols, intercept=intercept))[: bs - pad]
            correct += int((pred == arrays["labels"][sl]).sum())
        return correct / n
