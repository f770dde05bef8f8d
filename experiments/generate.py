"""Batched generation with adapted Flax causal LMs.

Decoding follows ``../shared/docs/EVAL_PROTOCOL.md`` (LLM-Adapters
``evaluate.py``): the Alpaca prompt without output, left-padded in batches,
then beam search with 4 beams (or greedy, ``num_beams=1``) through
``transformers``' `FlaxGenerationMixin.generate`, which supports both and
takes position ids from the attention mask, so left padding is exact.
Mergeable adapters are folded into the kernels first (`genlora_jax.merge`),
so inference runs the plain model with no interceptor; a tree holding an
adapter that cannot merge (AuroRA) is decoded inside `genlora_jax.adapted`.

Continuations are cut at the first EOS; `experiments.evaluate` appends them to
their prompts and reads the answer from the text after ``### Response:``,
exactly as LLM-Adapters reads the full decode (`experiments.scoring`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jaxtyping import Int
from tqdm.auto import tqdm
from transformers import GenerationConfig

import genlora_jax as gl

MIN_PROMPT_BUCKET = 32
"""Prompts are left-padded to a power of two ≥ this, to bound recompilations."""


def left_pad(
    sequences: Sequence[Sequence[int]], length: int, pad_id: int, rows: int | None = None
) -> tuple[Int[np.ndarray, "B L"], Int[np.ndarray, "B L"]]:
    """Left-pads token lists into fixed-shape ``(input_ids, attention_mask)``.

    Args:
        sequences: token lists, each at most ``length`` long.
        length: L.
        pad_id: id written into padding.
        rows: B ≥ ``len(sequences)``; missing rows repeat the first sequence
            (so the batch shape stays fixed) and are meant to be discarded.

    Returns:
        Two (B, L) int32 arrays; the mask is 1 on real tokens.
    """
    rows = len(sequences) if rows is None else rows
    ids = np.full((rows, length), pad_id, dtype=np.int32)
    mask = np.zeros((rows, length), dtype=np.int32)
    for row in range(rows):
        seq = sequences[row] if row < len(sequences) else sequences[0]
        if len(seq) > length:
            raise ValueError(f"sequence {row} has {len(seq)} tokens > length={length}.")
        if seq:
            ids[row, -len(seq) :] = seq
            mask[row, -len(seq) :] = 1
    return ids, mask


def _special_ids(tokenizer: Any) -> tuple[int, int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(
            f"{type(tokenizer).__name__} has no eos_token; generation needs one to stop. "
            "Set tokenizer.eos_token."
        )
    pad = tokenizer.pad_token_id
    return (eos if pad is None else pad), eos


@functools.lru_cache(maxsize=8)
def _decoder(model, max_new_tokens: int, num_beams: int, pad_id: int, eos_id: int, intercept: bool):
    """A jitted ``(params, ids (B, L), mask (B, L)) -> new tokens (B, max_new_tokens)``."""
    config = GenerationConfig(
        do_sample=False,
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
    )

    def decode(params, input_ids, attention_mask):
        with gl.adapted(enabled=intercept):
            out = model.generate(
                input_ids, generation_config=config, attention_mask=attention_mask, params=params
            )
        return out.sequences[:, input_ids.shape[1] :]

    return jax.jit(decode)


def _bucket(length: int) -> int:
    return max(MIN_PROMPT_BUCKET, 1 << (length - 1).bit_length())


def _prompt_length(longest: int, max_new_tokens: int, limit: int | None) -> int:
    """The padded prompt length L: a power of two when it fits the model."""
    bucket = _bucket(longest)
    if limit is None or bucket + max_new_tokens <= limit:
        return bucket
    if longest + max_new_tokens <= limit:
        return longest
    raise ValueError(
        f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the "
        f"model's max_position_embeddings={limit}; lower max_new_tokens or load the model "
        "with a larger max_position_embeddings."
    )


def _response(tokenizer: Any, tokens: np.ndarray, eos_id: int) -> str:
    """Decodes generated tokens up to (without) the first EOS."""
    tokens = tokens.tolist()
    if eos_id in tokens:
        tokens = tokens[: tokens.index(eos_id)]
    return tokenizer.decode(tokens, skip_special_tokens=True)


def generate(
    model,
    params: Mapping,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    num_beams: int = 1,
    batch_size: int = 8,
    desc: str | None = None,
) -> list[str]:
    """Continuations of ``prompts`` by the adapted model.

    Args:
        model: a `transformers` Flax causal LM (``FlaxLlamaForCausalLM``, ...).
        params: its wrapped params (or plain params).
        tokenizer: the model's tokenizer (its special tokens, e.g. BOS, are
            added as in training); ``pad_token_id`` falls back to EOS.
        prompts: N texts.
        max_new_tokens: generation budget T.
        num_beams: 1 for greedy, > 1 for beam search (no sampling).
        batch_size: B prompts per call; prompts are sorted by length and
            left-padded to a power of two (≥ 32), so one compilation serves
            many batches.
        desc: progress-bar label (None: no bar).

    Returns:
        N decoded continuations, cut before the first EOS, in prompt order.
    """
    tree, intercept = gl.inference_params(params)
    pad_id, eos_id = _special_ids(tokenizer)
    encoded = [list(tokenizer(prompt)["input_ids"]) for prompt in prompts]
    decode = _decoder(model, max_new_tokens, num_beams, pad_id, eos_id, intercept)
    limit = getattr(model.config, "max_position_embeddings", None)
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    responses: list[str] = [""] * len(prompts)
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=desc, disable=desc is None, dynamic_ncols=True):
        rows = order[start : start + batch_size]
        length = _prompt_length(max(len(encoded[i]) for i in rows), max_new_tokens, limit)
        ids, mask = left_pad([encoded[i] for i in rows], length, pad_id, rows=batch_size)
        tokens = np.asarray(decode(tree, ids, mask))
        for row, i in enumerate(rows):
            responses[i] = _response(tokenizer, tokens[row], eos_id)
    return responses
