"""A plain numpy reference of the exact search: the oracle the tests compare the native kernels with.

float64 scores, ties to the lower position (a stable sort), -inf / -1 padding: what ``Index.search`` returns, up to
the rounding of float32 arithmetic.
"""

from __future__ import annotations

import numpy as np


def reference_search(queries: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` rows of ``vectors`` (n, dim) by inner product with each query: (scores float64, positions int64)."""
    scores = np.asarray(queries, np.float64) @ np.asarray(vectors, np.float64).T
    nq, n = scores.shape
    kk = min(k, n)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :kk]
    out_s = np.full((nq, k), -np.inf)
    out_i = np.full((nq, k), -1, np.int64)
    out_s[:, :kk] = np.take_along_axis(scores, order, 1)
    out_i[:, :kk] = order
    return out_s, out_i
