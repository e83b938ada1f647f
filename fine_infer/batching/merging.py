"""Many requests' feeds as one batch, and the batch's outputs back as each request's own rows.

Inputs with a ``sequence`` axis are padded to the batch's longest (ids with the manifest's ``pad_id``, masks with
0); an output that follows that axis is cut back to each request's own length. Requests whose other dynamic axes
differ cannot be concatenated: they go to separate runs (:func:`groups`).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from fine_infer.errors import InputError
from fine_infer.runtime.buckets import plan_buckets
from fine_infer.specs import GraphSpec

PAD_AXES = ("sequence",)  # dynamic axes the batcher may pad; any other differing dynamic axis splits the batch

Feeds = dict[str, np.ndarray]


def feed_rows(feeds: Feeds) -> int:
    """Rows of a request: the leading size of its first input."""
    for v in feeds.values():
        return int(v.shape[0])
    raise InputError("no inputs given")


def batchable(spec: GraphSpec) -> bool:
    """A graph can be batched when every input and output has the dynamic ``batch`` axis first."""
    return all(t.shape and isinstance(t.shape[0], str) for t in (*spec.inputs, *spec.outputs))


def groups(spec: GraphSpec, reqs: list[Any]) -> list[list[Any]]:
    """Split requests (each with ``feeds``) by the sizes of dynamic axes that may not be padded (they must match to
    concatenate)."""
    fixed = [(t.name, i) for t in spec.inputs for i, d in enumerate(t.shape) if i > 0 and isinstance(d, str)
             and d not in PAD_AXES]
    if not fixed:
        return [reqs]
    out: dict[tuple, list[Any]] = {}
    for r in reqs:
        out.setdefault(tuple(r.feeds[n].shape[i] for n, i in fixed), []).append(r)
    return list(out.values())


def length_groups(spec: GraphSpec, groups_: list[list[Any]]) -> list[list[Any]]:
    """For a graph whose every input is padded along ``sequence`` (a text encoder): each group split into runs of
    similar length (:func:`fine_infer.runtime.buckets.plan_buckets`), so short texts are not padded to the batch's
    longest; other graphs' groups as they are (their fixed-size inputs cost the same whatever the padding)."""
    pad_inputs = [(t.name, i) for t in spec.inputs for i, d in enumerate(t.shape) if i > 0 and d in PAD_AXES]
    if not pad_inputs or {n for n, _ in pad_inputs} != {t.name for t in spec.inputs}:
        return groups_
    out: list[list[Any]] = []
    for group in groups_:
        if len(group) < 2:
            out.append(group)
            continue
        name, axis = pad_inputs[0]
        widths = np.array([r.feeds[name].shape[axis] for r in group])
        buckets = plan_buckets(widths, np.array([r.rows for r in group]))
        out.extend([group[int(k)] for k in sorted(b)] for b in buckets)
    return out


def merge(spec: GraphSpec, feeds: Sequence[Feeds], pad_id: int) -> tuple[Feeds, dict[str, list[int]]]:
    """One batch of ``feeds`` (padded where an axis in ``PAD_AXES`` differs), and per padded axis name each
    request's own size along it."""
    merged: Feeds = {}
    lengths: dict[str, list[int]] = {}
    total = sum(feed_rows(f) for f in feeds)
    for t in spec.inputs:
        arrays = [f[t.name] for f in feeds]
        pad_dims = [i for i, d in enumerate(t.shape) if i > 0 and d in PAD_AXES]
        shape = list(arrays[0].shape)
        shape[0] = total
        for i in pad_dims:
            shape[i] = max(a.shape[i] for a in arrays)
            lengths.setdefault(t.shape[i], [a.shape[i] for a in arrays])
        if pad_dims and any(a.shape[i] != shape[i] for a in arrays for i in pad_dims):
            value = 0 if "mask" in t.name.lower() else pad_id
            out = np.full(shape, value, dtype=arrays[0].dtype)
            if pad_dims == [1] and len(shape) == 2:
                # (batch, sequence): every row's tokens go to the start of its padded row, in one scatter.
                own = np.repeat([a.shape[1] for a in arrays], [a.shape[0] for a in arrays])
                out[np.arange(shape[1]) < own[:, None]] = np.concatenate([a.ravel() for a in arrays])
            else:  # each request copied into its corner
                lo = 0
                for a in arrays:
                    out[(slice(lo, lo + a.shape[0]), *(slice(0, n) for n in a.shape[1:]))] = a
                    lo += a.shape[0]
            merged[t.name] = out
        else:
            merged[t.name] = np.concatenate(arrays, axis=0)
    return merged, lengths


def split(spec: GraphSpec, out: Feeds, rows: Sequence[int], lengths: dict[str, list[int]]) -> list[Feeds]:
    """Each request's own rows of the batch's outputs: views (the rows are disjoint, so no caller sees another's
    writes; a copy per request costs more than a tiny model's share of the run), cut back to the request's own
    length along a padded axis."""
    parts: list[Feeds] = []
    lo = 0
    for k, n in enumerate(rows):
        hi = lo + n
        mine: Feeds = {}
        for t in spec.outputs:
            arr = out[t.name][lo:hi]
            for i, d in enumerate(t.shape):
                if i > 0 and d in lengths:  # an output that follows a padded axis
                    arr = arr[(slice(None),) * i + (slice(0, lengths[d][k]),)]
            mine[t.name] = arr
        parts.append(mine)
        lo = hi
    return parts
