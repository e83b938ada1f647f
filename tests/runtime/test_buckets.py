"""Length buckets (fine_infer.runtime.buckets): the planner's partition against brute force over every split, and
the lengths it reads from attention masks. The embeddings of a bucketed batch are checked against
sentence-transformers on the real MiniLM in tests/export/test_hf_export.py."""

import itertools

import numpy as np

from fine_infer.runtime.buckets import CALL_TOKENS, MIN_TOKENS, plan_buckets, sequence_lengths


def _cost(lengths, buckets):
    return sum(max(len(b) * int(lengths[b].max()), MIN_TOKENS) + CALL_TOKENS for b in buckets)


def _best_split_cost(sorted_lengths):
    """Every split of the longest-first order into contiguous runs (2^(n-1) of them)."""
    n = len(sorted_lengths)
    best = None
    for cuts in itertools.product((0, 1), repeat=n - 1):
        bounds = [0, *[i + 1 for i, c in enumerate(cuts) if c], n]
        cost = sum(max((b - a) * sorted_lengths[a], MIN_TOKENS) + CALL_TOKENS for a, b in zip(bounds, bounds[1:]))
        best = cost if best is None else min(best, cost)
    return best


def test_the_plan_is_a_partition_as_cheap_as_the_best_split(rng):
    for _ in range(40):
        n = int(rng.integers(1, 12))
        lengths = rng.integers(1, int(rng.choice([16, 64, 300])), n)
        buckets = plan_buckets(lengths)
        assert sorted(np.concatenate(buckets).tolist()) == list(range(n))
        assert _cost(lengths, buckets) == _best_split_cost(sorted(lengths.tolist(), reverse=True)), lengths
        assert _cost(lengths, buckets) <= _cost(lengths, [np.arange(n)])


def test_equal_lengths_stay_one_batch_and_a_wide_spread_splits(rng):
    assert len(plan_buckets(np.full(32, 20))) == 1
    lengths = np.concatenate([np.full(16, 8), np.full(16, 120)])[rng.permutation(32)]
    buckets = plan_buckets(lengths)
    assert len(buckets) >= 2 and all(len(set(lengths[b].tolist())) == 1 for b in buckets), buckets


def test_a_large_batch_is_planned_within_the_row_window(rng):
    lengths = rng.integers(3, 256, 1024)
    buckets = plan_buckets(lengths, max_rows=64)
    assert max(len(b) for b in buckets) <= 64
    assert sorted(np.concatenate(buckets).tolist()) == list(range(1024))


def test_sequence_lengths_from_masks():
    right = np.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    assert sequence_lengths(right).tolist() == [3, 1, 5]
    left = np.array([[0, 0, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert sequence_lengths(left).tolist() == [5, 5]  # left padding: every row needs every column
    assert sequence_lengths(np.zeros((1, 4), np.int64)).tolist() == [1]
