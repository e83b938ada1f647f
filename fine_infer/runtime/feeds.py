"""Synthetic feeds for a graph: what timing runs (batch calibration, bench, tune) feed a graph when no real input
is at hand."""

from __future__ import annotations

import math

import numpy as np

from fine_infer.specs import GraphSpec, TextPreprocess

Feeds = dict[str, np.ndarray]


def example_feeds(
    spec: GraphSpec,
    batch: int,
    text: TextPreprocess | None = None,
    vocab: int | None = None,
    seq_len: int | None = None,
    seed: int = 0,
) -> Feeds:
    """Synthetic feeds for timing ``spec`` at ``batch`` rows: normal floats, valid token ids, all-ones masks.

    The sequence length is the manifest's ``max_length`` when it pads to it, else ``seq_len`` (default 16, capped
    at ``max_length``), so timings match what real queries cost.
    """
    rng = np.random.default_rng(seed)
    if seq_len is None:
        seq_len = 16
        if text is not None:
            seq_len = text.max_length if text.padding == "max_length" else min(seq_len, text.max_length)
    low = max(1, text.first_word_id if text else 1)
    high = max(low + 1, vocab or low + 1)
    feeds: Feeds = {}
    for t in spec.inputs:
        shape = tuple(batch if i == 0 else (d if isinstance(d, int) else seq_len) for i, d in enumerate(t.shape))
        dtype = np.dtype(t.dtype)
        if dtype.kind == "f":
            feeds[t.name] = rng.standard_normal(shape).astype(dtype)
        elif "mask" in t.name.lower():
            feeds[t.name] = np.ones(shape, dtype)
        elif dtype.kind in "iu":
            feeds[t.name] = rng.integers(low, high, shape).astype(dtype)
        else:
            feeds[t.name] = np.zeros(shape, dtype)
    return feeds


def repeat_rows(feeds: Feeds, batch: int) -> Feeds:
    """``feeds`` with their rows repeated (cycled) to exactly ``batch`` rows."""
    out = {}
    for name, arr in feeds.items():
        reps = math.ceil(batch / arr.shape[0])
        out[name] = np.ascontiguousarray(np.concatenate([arr] * reps, axis=0)[:batch])
    return out
