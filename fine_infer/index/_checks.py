"""What the :class:`~fine_infer.index.Index` checks before anything reaches the native core: vectors, ids, metadata
and k, each with a one-line error naming the problem; and the lock that lets searches run beside each other but not
beside a mutation."""

from __future__ import annotations

import contextlib
import json
import numbers
import threading
from typing import Any, Iterator, Sequence

import numpy as np

from fine_infer import _strict_json
from fine_infer.errors import InputError
from fine_infer.index._storage import SLICE

#: Largest magnitude of a vector or query value: |x| * |q| * dim then stays far inside float32 for any dim an index
#: takes (1e15 * 1e15 * 65536 < 3.4e38), so no score can overflow to inf or NaN and rank wrongly.
MAX_ABS_VALUE = 1e15

#: Largest k a search accepts (results are (queries, k) arrays; larger k is a full sort, not a top-k).
MAX_K = 100_000


class RWLock:
    """Many concurrent searches, or one mutation: a search runs without the GIL, so an ``add`` or ``remove`` from
    another thread must not move vectors under it. Writers are preferred so a stream of searches cannot starve them."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def as_matrix(x: Any, dim: int, what: str) -> np.ndarray:
    """A C-contiguous float32 (n, dim) array from any floating-point 2-D array-like, or an InputError naming why not."""
    try:
        a = np.asarray(x)
    except (ValueError, TypeError) as exc:
        raise InputError(f"{what} must be a 2-D floating-point array (n, {dim}): {exc}") from None
    if a.dtype.kind != "f":
        raise InputError(f"{what} must be floating point (float32 preferred), got dtype {a.dtype}")
    if a.ndim != 2:
        hint = f"; for a single vector pass x[None, :] (shape (1, {dim}))" if a.ndim == 1 else ""
        raise InputError(f"{what} must be 2-D (n, {dim}), got shape {a.shape}{hint}")
    if a.shape[1] != dim:
        raise InputError(f"{what} have dim {a.shape[1]}; this index holds {dim}-d vectors")
    with np.errstate(over="ignore"):  # values beyond float32 become inf here and are reported just below
        out = np.ascontiguousarray(a, dtype=np.float32)
    for lo in range(0, len(out), SLICE):  # in slices: no n x dim boolean temporary for a large batch
        finite = np.isfinite(out[lo : lo + SLICE])
        if not finite.all():
            row, col = np.argwhere(~finite)[0]
            row += lo
            value = a[row, col]
            kind = "NaN" if np.isnan(value) else "inf" if np.isinf(value) else f"{value!r} (beyond float32 range)"
            count = int((~np.isfinite(out).all(axis=1)).sum())
            raise InputError(f"{what} row {row} holds {kind} at dimension {col} ({count} row(s) with non-finite "
                             "values); NaN and inf are refused")
        big = np.abs(out[lo : lo + SLICE]) > MAX_ABS_VALUE
        if big.any():
            row, col = np.argwhere(big)[0]
            raise InputError(f"{what} row {row + lo} holds {float(out[row + lo, col]):.3g} at dimension {col}: values "
                             f"over {MAX_ABS_VALUE:.0e} in magnitude could overflow float32 scores; normalise the "
                             "vectors (retrieval embeddings are unit rows)")
    return out


def as_ids(ids: Any, count: int | None, what: str = "ids") -> np.ndarray:
    """int64 ids: integers, 1-D, ``count`` of them (when given), no -1 (the padding id), no duplicates."""
    if isinstance(ids, (numbers.Integral, np.integer)) and not isinstance(ids, bool):
        ids = [ids]
    try:
        a = np.asarray(ids)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InputError(f"{what} must be a 1-D sequence of integers: {exc}") from None
    if a.size == 0 and a.dtype.kind == "f":  # [] comes out as float64
        a = a.astype(np.int64)
    if a.dtype.kind not in "iu" or a.dtype == np.bool_:
        raise InputError(f"{what} must be integers (int64), got dtype {a.dtype}")
    if a.ndim != 1:
        raise InputError(f"{what} must be 1-D, got shape {a.shape}")
    if a.dtype.kind == "u" and a.size and a.max() > np.iinfo(np.int64).max:
        raise InputError(f"{what} must fit in int64; {int(a.max())} does not")
    a = a.astype(np.int64)
    if count is not None and a.size != count:
        raise InputError(f"{a.size} {what} for {count} vectors; give one id per vector")
    if (a == -1).any():
        raise InputError(f"{what} may not contain -1: it marks 'no result' in search output")
    uniq, counts = np.unique(a, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1][:5].tolist()
        raise InputError(f"{what} repeat within one call: {dup}")
    return a


def as_metadata(metadata: Any, count: int) -> list[dict[str, Any] | None] | None:
    """One JSON-able dict (or None) per vector, stored as its JSON round trip (what a reload would give back)."""
    if metadata is None:
        return None
    if isinstance(metadata, dict) or not isinstance(metadata, Sequence) or isinstance(metadata, (str, bytes)):
        raise InputError("metadata must be a list with one dict (or None) per vector")
    if len(metadata) != count:
        raise InputError(f"{len(metadata)} metadata entries for {count} vectors; give one per vector (or None)")
    out: list[dict[str, Any] | None] = []
    for j, m in enumerate(metadata):
        if m is None:
            out.append(None)
            continue
        if not isinstance(m, dict):
            raise InputError(f"metadata[{j}] must be a dict or None, got {type(m).__name__}")
        try:
            _strict_json.check_depth(m)  # first: json.dumps would recurse as deep as it goes
            text = json.dumps(m, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InputError(f"metadata[{j}] is not JSON-serialisable: {exc}") from None
        out.append(json.loads(text))
    return out


def check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (numbers.Integral, np.integer)):
        raise InputError(f"k must be an integer, got {type(k).__name__}")
    if not 1 <= int(k) <= MAX_K:
        raise InputError(f"k must be between 1 and {MAX_K}, got {int(k)}")
    return int(k)
