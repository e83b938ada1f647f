"""Choosing a batching plan from per-item costs: how many rows per model run, on how many lanes.

The costs come from the batcher's own calibration (:mod:`fine_infer.batching.calibration`) or from the rows of a
``fine-infer bench`` result (:func:`bench_batch_sizes`, given the parsed result: reading the file is the caller's job).
"""

from __future__ import annotations

from typing import Any, Mapping

from fine_infer.errors import ConfigError

# A batch size is "as good as the best" within this margin, and the smallest such size wins: a gain this small does
# not pay for a longer batch (its callers wait for more rows, and a longer run).
NEAR_BEST = 1.02
# Batching must save at least this much per item over (concurrent) batch-1 runs, or it is not used: a batch runs in
# one worker thread, and on a CPU shared with other processes that thread gets a smaller share than many callers'
# threads do, so a small saving measured in calibration can turn into a loss under load (benchmarks/RESULTS.md,
# Serving).
MIN_BATCH_GAIN = 1.15


def pick_batch_size(per_item_ms: Mapping[int, float]) -> int:
    """The smallest batch size whose per-item cost is within ``NEAR_BEST`` of the cheapest measured; but 1 (no
    batching) when no batch size saves at least ``MIN_BATCH_GAIN`` over batch 1, or nothing was measured."""
    if not per_item_ms:
        return 1
    best = min(per_item_ms.values())
    if 1 in per_item_ms and per_item_ms[1] <= best * MIN_BATCH_GAIN:
        return 1
    return min(b for b, ms in per_item_ms.items() if ms <= best * NEAR_BEST)


def pick_plan(per_item_ms: Mapping[int, float], lane_per_item_ms: Mapping[int, float],
              lanes: int) -> tuple[int, int]:
    """``(lanes, max_batch_size)``: one lane (batches on the session's own runner, ``per_item_ms``) or ``lanes``
    single-threaded lanes (``lane_per_item_ms``, each at that batch size), whichever is cheapest per item; the
    smallest batch within ``NEAR_BEST`` of the best, one lane on a tie. ``(1, 1)`` (no batching) when nothing saves
    at least ``MIN_BATCH_GAIN`` over batch 1."""
    if not lane_per_item_ms or lanes < 2:
        return 1, pick_batch_size(per_item_ms)
    candidates = {(1, b): v for b, v in per_item_ms.items() if b > 1}
    candidates.update({(lanes, b): v for b, v in lane_per_item_ms.items() if b > 1})
    if not candidates:
        return 1, pick_batch_size(per_item_ms)
    best = min(candidates.values())
    if 1 in per_item_ms and per_item_ms[1] <= best * MIN_BATCH_GAIN:
        return 1, 1
    return min(k for k, v in candidates.items() if v <= best * NEAR_BEST)


def bench_batch_sizes(result: Mapping[str, Any], backend: str) -> dict[str, int]:
    """Per graph, the batch size a parsed ``fine-infer bench`` result says is best for ``backend``: its rows of mode
    ``runtime`` on that backend, ms per item by batch size, through :func:`pick_batch_size`."""
    rows = result.get("rows") if isinstance(result, Mapping) else None
    if not isinstance(rows, list):
        raise ConfigError("bench result has no 'rows' list; write one with `fine-infer bench BUNDLE --json FILE`")
    per_graph: dict[str, dict[int, float]] = {}
    for r in rows:
        if r.get("backend") == backend and r.get("mode", "runtime") == "runtime" and r.get("ms_per_item"):
            per_graph.setdefault(r["graph"], {})[int(r["batch"])] = float(r["ms_per_item"])
    return {g: pick_batch_size(v) for g, v in per_graph.items()}
