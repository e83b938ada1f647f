"""Vector storage in the native panel layout, for float32, float16 and int8 (per-dimension symmetric scale).

Slot ``s``, dimension ``d`` lives at ``panels[s // 16, d, s % 16]``: one panel row of 16 slots is one 64-byte vector,
so the C++ kernels stream the gallery with broadcast-multiply-adds and no transposition (see ``cpp/kernels.hpp``).
Slots ``>= n`` in the last panel are kept zero so saved files are deterministic. The optional row-major float32 copies
(``Index(..., rescore=True)``) live beside the panels, for exact re-scoring of int8 / float16 candidates.
"""

from __future__ import annotations

import numpy as np

from fine_infer.index._native_search import PANEL

DTYPES = ("float32", "float16", "int8")
INT8_MAX = 127
FLOAT16_MAX = float(np.finfo(np.float16).max)


#: Rows per slice when encoding or reducing a batch: bounds the temporaries of a 1M-vector add to a few MB.
SLICE = 1 << 14


def panels_for(n: int) -> int:
    """Panels needed for ``n`` slots."""
    return -(-n // PANEL)


def abs_colmax(x: np.ndarray) -> np.ndarray:
    """max |x| per column (float32), in row slices so no |x| temporary of the whole batch is made."""
    out = np.zeros(x.shape[1], np.float32)
    for lo in range(0, len(x), SLICE):
        np.maximum(out, np.abs(x[lo : lo + SLICE]).max(axis=0), out=out)
    return out


class PanelStore:
    """``n`` vectors of ``dim`` values of ``dtype`` in panels with spare capacity; optional float32 copies.

    Not thread-safe: the :class:`~fine_infer.index.Index` serialises writers and excludes them from searches."""

    def __init__(self, dim: int, dtype: str, keep_float32: bool) -> None:
        self.dim = dim
        self.dtype = np.dtype(dtype)
        self.n = 0
        self.panels = np.zeros((0, dim, PANEL), self.dtype)
        self.rows: np.ndarray | None = np.zeros((0, dim), np.float32) if keep_float32 else None
        # int8: value = scales[d] * stored. colmax: a running upper bound of |value| per dimension (never shrinks),
        # which bounds the quantisation error for exact re-scoring.
        self.scales: np.ndarray | None = np.ones(dim, np.float32) / INT8_MAX if self.dtype == np.int8 else None
        self.colmax = np.zeros(dim, np.float32)

    # --- capacity ---------------------------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Slots that can be written without growing (a loaded file's copies hold exactly n rows)."""
        cap = self.panels.shape[0] * PANEL
        return cap if self.rows is None else min(cap, self.rows.shape[0])

    def writable(self) -> bool:
        """False for memory-mapped (read-only) arrays: a mutation first copies them into RAM."""
        return self.panels.flags.writeable and (self.rows is None or self.rows.flags.writeable)

    def materialize(self) -> None:
        """Copy memory-mapped arrays into RAM (before the first mutation of a loaded ``mmap=True`` index)."""
        self.panels = np.array(self.panels, copy=True)
        if self.rows is not None:
            self.rows = np.array(self.rows, copy=True)

    def reserve(self, n: int) -> None:
        """Make room for ``n`` slots, growing geometrically so repeated small adds stay amortised O(1)."""
        if n <= self.capacity and self.writable():
            return
        want = panels_for(max(n, self.capacity + self.capacity // 2, 64))
        used = panels_for(self.n)
        panels = np.zeros((want, self.dim, PANEL), self.dtype)
        panels[:used] = self.panels[:used]
        self.panels = panels
        if self.rows is not None:
            rows = np.zeros((want * PANEL, self.dim), np.float32)
            rows[: self.n] = self.rows[: self.n]
            self.rows = rows

    # --- encoding ---------------------------------------------------------------------------------------------------

    def grow_scales(self, x: np.ndarray) -> None:
        """int8: widen the per-dimension scales so ``x`` fits, re-quantising the stored columns that change.

        Re-quantisation is exact from the float32 copies when they are kept; otherwise it rounds the stored values
        once more (an extra error of at most half a new step in those dimensions). Scales never shrink."""
        assert self.scales is not None
        need = abs_colmax(x) / np.float32(INT8_MAX)
        grow = np.flatnonzero(need > self.scales)
        if self.n == 0:  # nothing stored: fit the scales to this batch (an all-zero dimension gets a step of 1/127)
            self.scales[:] = np.where(need > 0, need, np.float32(1 / INT8_MAX))
            return
        if grow.size == 0:
            return
        old, new = self.scales[grow].copy(), need[grow]
        used = panels_for(self.n)
        if self.rows is not None:
            cols = self.rows[: self.n, grow] / new  # (n, g) from the exact copies
            q = np.clip(np.rint(cols), -INT8_MAX, INT8_MAX).astype(np.int8)
            buf = np.zeros((used * PANEL, grow.size), np.int8)
            buf[: self.n] = q
            self.panels[:used, grow, :] = buf.reshape(used, PANEL, grow.size).transpose(0, 2, 1)
        else:
            block = self.panels[:used, grow, :].astype(np.float32) * (old / new)[None, :, None]
            self.panels[:used, grow, :] = np.clip(np.rint(block), -INT8_MAX, INT8_MAX).astype(np.int8)
        self.scales[grow] = new

    def encode(self, x: np.ndarray) -> np.ndarray:
        """float32 rows -> rows of the storage dtype (int8: with the current scales, which must already fit)."""
        if self.dtype == np.float32:
            return x
        if self.dtype == np.float16:
            return x.astype(np.float16)
        assert self.scales is not None
        return np.clip(np.rint(x / self.scales), -INT8_MAX, INT8_MAX).astype(np.int8)

    def decode(self, stored: np.ndarray) -> np.ndarray:
        """Stored rows -> float32 (dequantised)."""
        if self.dtype == np.int8:
            assert self.scales is not None
            return stored.astype(np.float32) * self.scales
        return stored.astype(np.float32)

    # --- rows in and out ----------------------------------------------------------------------------------------------

    def _scatter(self, slots: np.ndarray, enc: np.ndarray) -> None:
        self.panels[slots // PANEL, :, slots % PANEL] = enc

    def write_range(self, start: int, x: np.ndarray) -> None:
        """Store float32 rows ``x`` at slots ``start ..`` (capacity reserved by the caller), a slice at a time."""
        for lo in range(0, len(x), SLICE):
            self._write_slice(start + lo, x[lo : lo + SLICE])
        if self.rows is not None:
            self.rows[start : start + len(x)] = x
        if len(x):
            np.maximum(self.colmax, abs_colmax(x), out=self.colmax)

    def _write_slice(self, start: int, x: np.ndarray) -> None:
        enc = self.encode(x)
        stop = start + len(x)
        head = min(stop, panels_for(start) * PANEL)  # slots up to the next panel boundary
        if head > start:
            self._scatter(np.arange(start, head), enc[: head - start])
        body = head + (stop - head) // PANEL * PANEL  # whole panels: one strided copy
        if body > head:
            self.panels[head // PANEL : body // PANEL] = (
                enc[head - start : body - start].reshape(-1, PANEL, self.dim).transpose(0, 2, 1))
        if stop > body:
            self._scatter(np.arange(body, stop), enc[body - start :])

    def write_at(self, slots: np.ndarray, x: np.ndarray) -> None:
        """Overwrite the vectors of existing ``slots`` (upsert)."""
        self._scatter(slots, self.encode(x))
        if self.rows is not None:
            self.rows[slots] = x
        if len(x):
            np.maximum(self.colmax, abs_colmax(x), out=self.colmax)

    def read(self, slots: np.ndarray | None = None) -> np.ndarray:
        """float32 (m, dim) rows of ``slots`` (all ``n`` when None): the exact copies if kept, else dequantised."""
        if slots is None:
            if self.rows is not None:
                return np.array(self.rows[: self.n])
            used = panels_for(self.n)
            flat = self.panels[:used].transpose(0, 2, 1).reshape(used * PANEL, self.dim)[: self.n]
            return self.decode(flat)
        if self.rows is not None:
            return self.rows[slots]
        return self.decode(self.panels[slots // PANEL, :, slots % PANEL])

    def move(self, dst: np.ndarray, src: np.ndarray) -> None:
        """Copy slots ``src`` onto slots ``dst`` (removal compaction)."""
        if dst.size:
            self.panels[dst // PANEL, :, dst % PANEL] = self.panels[src // PANEL, :, src % PANEL]
            if self.rows is not None:
                self.rows[dst] = self.rows[src]

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` slots; zero the freed lanes of the last panel (deterministic files)."""
        if n < self.n:
            freed = np.arange(n, min(self.n, panels_for(n) * PANEL))
            if freed.size:
                self.panels[freed // PANEL, :, freed % PANEL] = 0
            if self.rows is not None:
                self.rows[n : self.n] = 0
        self.n = n

    # --- exactness --------------------------------------------------------------------------------------------------

    def error_bound(self, queries: np.ndarray) -> np.ndarray:
        """Per query, an upper bound of |score from the stored values - score from the float32 vectors|.

        int8: each value is off by at most half a step (the copies are kept, so no double rounding). float16: by at
        most 2^-11 of its magnitude (2^-25 absolute in the subnormal range). Plus fp32 summation error, twice
        (the approximate and the exact score), bounded by 2*(dim+4)*2^-24 * sum|q||x|."""
        aq = np.abs(queries).astype(np.float64)
        colmax = self.colmax.astype(np.float64)
        if self.dtype == np.int8:
            assert self.scales is not None
            quant = self.scales.astype(np.float64) / 2
        elif self.dtype == np.float16:
            quant = colmax * 2.0**-11 + 2.0**-25
        else:
            quant = np.zeros_like(colmax)
        rounding = 2 * (self.dim + 4) * 2.0**-24 * (colmax + quant)  # + the int8 scale folded into the query
        return aq @ (quant + rounding) * 1.01 + 1e-12
