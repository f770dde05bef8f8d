"""Fixed-shape batches for jitted steps: padding, resumable shuffled streams, length buckets."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np

IGNORE_INDEX = -100
"""Label value of tokens that carry no loss (as in Hugging Face / LLM-Adapters)."""


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
