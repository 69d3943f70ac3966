"""Length bucketing: few padded shapes, every item once, no item longer than its bucket."""

from __future__ import annotations

import numpy as np
import pytest

from convert.base.batching import bucket_boundaries, bucket_of, length_batches


def test_boundaries_are_few_sorted_multiples_covering_the_range():
    edges = bucket_boundaries(16000, 240000, count=6, multiple=320)
    assert len(edges) <= 6 and list(edges) == sorted(set(edges))
    assert edges[0] >= 16000 and edges[-1] >= 240000 and edges[-1] - 240000 < 320
    assert all(e % 320 == 0 for e in edges)
    assert bucket_boundaries(5, 5, count=4) == (5,)


def test_every_item_lands_once_in_a_bucket_that_holds_it():
    rng = np.random.default_rng(0)
    lengths = rng.integers(16000, 240000, 100)
    edges = bucket_boundaries(int(lengths.min()), int(lengths.max()), count=5, multiple=320)
    for shuffle in (None, np.random.default_rng(1)):
        batches = length_batches(lengths, 8, edges, rng=shuffle)
        seen = sorted(i for b in batches for i in b.indices)
        assert seen == list(range(100))
        assert all(lengths[i] <= b.padded_length for b in batches for i in b.indices)
        assert {b.padded_length for b in batches} <= set(edges)
        assert all(b.batch_size == 8 and 1 <= len(b.indices) <= 8 for b in batches)
        # One compiled shape per bucket: (batch_size, padded_length) pairs are as few as the buckets used.
        assert len({(b.batch_size, b.padded_length) for b in batches}) <= len(edges)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        bucket_of(10, (4, 8))
    with pytest.raises(ValueError, match="batch_size"):
        length_batches([1], 0, (4,))
    with pytest.raises(ValueError, match="min_length"):
        bucket_boundaries(0, 10)
