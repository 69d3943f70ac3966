"""Grouping utterances of mixed lengths into batches of a few padded shapes, so that a jitted function compiles
a few times (once per shape), not once per batch.

Lengths are rounded up to a bucket boundary from a short geometric ladder; utterances in one batch share a
bucket. Used by transcription (`convert.generate`) and fine-tuning (`convert.finetune`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Batch:
    """Which items form a batch and the length every one of them is padded to.

    Attributes:
        indices: positions of the items in the input sequence, in the order they sit in the batch.
        padded_length: the bucket boundary (>= every item's length).
        batch_size: the number of rows the compiled function sees (>= len(indices)); rows beyond
            `len(indices)` are padding rows that the caller fills with silence and ignores, so that the
            last, partial batch of a bucket does not compile a new shape.
    """

    indices: tuple[int, ...]
    padded_length: int
    batch_size: int


def bucket_boundaries(min_length: int, max_length: int, count: int = 8, multiple: int = 1) -> tuple[int, ...]:
    """A geometric ladder of at most `count` lengths from `min_length` to `max_length`, each a multiple of
    `multiple` (e.g. 320 samples, one encoder frame, so that no bucket wastes a partial frame).

    Args:
        min_length: the shortest item's length (the first boundary is at least this).
        max_length: the longest item's length (the last boundary is at least this).
        count: how many distinct padded shapes to allow.
        multiple: round every boundary up to a multiple of this.
    """
    if min_length < 1 or max_length < min_length:
        raise ValueError(f"need 1 <= min_length <= max_length, got {min_length}, {max_length}")
    if count < 1 or multiple < 1:
        raise ValueError(f"count={count} and multiple={multiple} must be at least 1")
    up = lambda n: int(math.ceil(n / multiple) * multiple)  # noqa: E731
    if count == 1 or min_length == max_length:
        return (up(max_length),)
    ratio = (max_length / min_length) ** (1.0 / (count - 1))
    edges = sorted({up(min_length * ratio**k) for k in range(count - 1)} | {up(max_length)})
    return tuple(edges)


def bucket_of(length: int, boundaries: Sequence[int]) -> int:
    """The smallest boundary >= `length`."""
    for b in boundaries:
        if length <= b:
            return b
    raise ValueError(f"length {length} exceeds the largest bucket {boundaries[-1]}")


def length_batches(
    lengths: Sequence[int],
    batch_size: int,
    boundaries: Sequence[int],
    *,
    rng: np.random.Generator | None = None,
    fixed_batch_size: bool = True,
) -> list[Batch]:
    """Batches of items that share a bucket.

    Args:
        lengths: each item's length (e.g. samples).
        batch_size: items per batch.
        boundaries: bucket boundaries (see `bucket_boundaries`).
        rng: shuffle items within buckets and the batch order (training); None keeps input order within a
            bucket and batches ordered by bucket (inference).
        fixed_batch_size: report `batch_size` rows for partial batches too (one compiled shape per bucket).

    Returns:
        The batches; every item appears in exactly one.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    by_bucket: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_bucket.setdefault(bucket_of(int(n), boundaries), []).append(i)
    batches = []
    for bucket in sorted(by_bucket):
        items = by_bucket[bucket]
        if rng is not None:
            items = [items[k] for k in rng.permutation(len(items))]
        for start in range(0, len(items), batch_size):
            chunk = tuple(items[start:start + batch_size])
            batches.append(Batch(chunk, bucket, batch_size if fixed_batch_size else len(chunk)))
    if rng is not None:
        batches = [batches[k] for k in rng.permutation(len(batches))]
    return batches
