"""Datasets, tokenisation and fixed-shape batching for the GenLoRA experiments.

One module per source, all re-exported here (``from experiments import data``):

- `experiments.data.paths`: the local data root (``$GENLORA_DATA``, default
  ``../shared/data`` next to the repository); the hubs are used only when no
  local copy is configured.
- `experiments.data.instructions`: LLM-Adapters instruction files, the Alpaca
  prompt and causal-LM tokenisation (LLM-Adapters' recipe; see
  ``../shared/docs/EVAL_PROTOCOL.md``).
- `experiments.data.glue`: GLUE SST-2 and BoolQ (questions only) for sequence
  classification, as fixed-length arrays.
- `experiments.data.batching`: right-padding, resumable shuffled streams,
  length-grouped orders and length buckets for jitted steps.
"""

from experiments.data.batching import (
    IGNORE_INDEX,
    iterate_batches,
    length_grouped_order,
    pad_batch,
    stream_indices,
    trim_padding,
)
from experiments.data.glue import load_boolq, load_sst2, tokenize_classification
from experiments.data.instructions import (
    alpaca_prompt,
    check_instruction_file,
    load_instruction_dataset,
    tokenize_for_causal_lm,
)
from experiments.data.paths import DATA_ENV_VAR, default_data_dir

__all__ = [
    "DATA_ENV_VAR",
    "IGNORE_INDEX",
    "alpaca_prompt",
    "check_instruction_file",
    "default_data_dir",
    "iterate_batches",
    "length_grouped_order",
    "load_boolq",
    "load_instruction_dataset",
    "load_sst2",
    "pad_batch",
    "stream_indices",
    "tokenize_classification",
    "tokenize_for_causal_lm",
    "trim_padding",
]
