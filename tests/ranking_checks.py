"""Ranking comparisons shared by the index and serve tests."""

import numpy as np


def same_ids_ties_aside(ids: np.ndarray, ref_scores: np.ndarray, ref_ids: np.ndarray, scores: np.ndarray,
                        tol: float = 1e-5) -> None:
    """Ids equal the reference's, except where the reference's scores tie within ``tol`` (float32 rounding, or a
    query embedded in a padded batch instead of alone): there two hits may swap, or the k-th may be another id."""
    ids, ref_ids = np.atleast_2d(ids), np.atleast_2d(ref_ids)
    ref_scores, scores = np.atleast_2d(ref_scores), np.atleast_2d(scores)
    assert ids.shape == ref_ids.shape, (ids.shape, ref_ids.shape)
    for row in range(len(ids)):
        for r in range(ids.shape[1]):
            if ids[row, r] == ref_ids[row, r]:
                continue
            # A swap is acceptable only between (near-)equal reference scores.
            assert abs(scores[row, r] - ref_scores[row, r]) <= tol, (row, r, ids[row, r], ref_ids[row, r])
