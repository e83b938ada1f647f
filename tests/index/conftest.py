"""Shared data for the index tests: random unit vectors (the embeddings fine-infer produces are unit-norm)."""

import numpy as np
import pytest


def unit(n: int, dim: int, seed: int) -> np.ndarray:
    """n random unit vectors (float32)."""
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each row of `truth` (ids) present in the same row of `found`."""
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth)]))


@pytest.fixture(params=["float32", "float16", "int8"])
def dtype(request):
    return request.param
