"""Timing a graph to choose its batching plan: per-item cost at each batch size, on one lane and on several.

Batching pays only where a graph is not compute-bound on this machine (an overhead-bound text encoder gets cheaper
per item as the batch grows; a compute-bound vision tower can get dearer), and where lanes pay depends on the cores
(benchmarks/RESULTS.md, Serving). So the plan is measured per graph on the machine that serves, never guessed:
:func:`calibrate` times the graph through a ``run(feeds, threads)`` callable and picks with
:func:`~fine_infer.batching.plan.pick_plan`.
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from fine_infer.batching.merging import feed_rows
from fine_infer.batching.plan import pick_plan
from fine_infer.runtime.feeds import repeat_rows

Feeds = dict[str, np.ndarray]
# One model run of the graph being timed; ``threads``: on a lane's runner with that many intra-op threads (None: the
# session's own runner).
RunFn = Callable[[Feeds, "int | None"], Feeds]

CALIBRATION_BATCHES = (1, 2, 4, 8, 16, 32)
# Batch 1 is timed with this many callers at once: with max_batch_size 1 every caller runs the graph in its own
# thread, and concurrent runs share the cores better than one run alone does, so that is what a batch has to beat.
# Four per core (at most 8) get what many unbatched callers get; more would only lengthen the calibration.
CALIBRATION_CALLERS = max(1, min(8, 4 * (os.cpu_count() or 1)))


@dataclass
class Calibration:
    """What was measured for one graph: per-item ms by batch size, and the pick."""

    graph: str
    per_item_ms: dict[int, float]
    max_batch_size: int
    seconds: float
    source: str = "measured"  # or "bench:<file>" / "fixed" / "unbatchable"
    # Batches of this graph in the model at once, each in a worker of its own on a runner with threads/lanes
    # intra-op threads; and the per-item ms measured for that many single-threaded lanes, by batch size.
    lanes: int = 1
    lane_per_item_ms: dict[int, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (keys as strings)."""
        return {"graph": self.graph, "per_item_ms": {str(k): v for k, v in self.per_item_ms.items()},
                "max_batch_size": self.max_batch_size, "seconds": self.seconds, "source": self.source,
                "lanes": self.lanes,
                "lane_per_item_ms": {str(k): v for k, v in self.lane_per_item_ms.items()}}


def calibrate(graph: str, run: RunFn, sample: Feeds, batch_sizes: Sequence[int], budget_s: float, *, lanes: int = 1,
              lane_threads: int = 1, fixed_lanes: bool = False, start: float | None = None) -> Calibration:
    """Time ``run`` at each batch size (``sample`` repeated to it) and pick the plan cheapest per item.

    Each size gets a warm-up run, then at least 3 timed runs, in two passes (ascending, then descending); its fastest
    run counts. Batch 1 is timed as ``CALIBRATION_CALLERS`` concurrent callers (what unbatched requests get). The
    first pass stops early once a size costs 25% more per item than the best batch so far (compute-bound: bigger
    only gets worse) or its share of the time budget is spent. With ``lanes`` > 1, that many lanes of
    ``lane_threads`` threads are timed too, at the batch sizes whose total over the lanes stays within the largest;
    ``fixed_lanes``: the lanes are not a choice, so one lane is timed at batch 1 only (the unbatched reference).
    ``start``: the ``perf_counter`` time the budget counts from (default now).
    """
    t_start = time.perf_counter() if start is None else start
    sizes = sorted(set(int(x) for x in batch_sizes))
    lane_sizes = [b for b in sizes if b > 1 and lanes * b <= sizes[-1]] if lanes > 1 else []
    if fixed_lanes and lanes > 1:
        sizes = [1]

    def single(b: int) -> float:  # batch 1 as concurrent callers: what unbatched requests get
        return time_per_item(run, repeat_rows(sample, b), b == 1)

    def laned(b: int) -> float:
        return time_concurrent(run, repeat_rows(sample, b), lanes, lane_threads)

    # Two passes, ascending then descending, keeping each size's fastest run: a noisy neighbour on a shared CPU only
    # ever adds time, and a drift during the first pass is not mistaken for a trend.
    share = budget_s / (3 if lane_sizes else 2)
    per_item = _first_pass(sizes, single, t_start + share)
    lane_per_item = _first_pass(lane_sizes, laned, t_start + 2 * share) if lane_sizes else {}
    _second_pass(per_item, single, t_start + (budget_s + 2 * share) / 2 if lane_sizes else t_start + budget_s)
    _second_pass(lane_per_item, laned, t_start + budget_s)
    n_lanes, picked = pick_plan(per_item, lane_per_item, lanes)
    return Calibration(graph, per_item, picked, time.perf_counter() - t_start, lanes=n_lanes,
                       lane_per_item_ms=lane_per_item)


def time_per_item(run: RunFn, feeds: Feeds, concurrent: bool = False) -> float:
    """Fastest of >= 3 runs (and >= 0.05 s, at most 50 runs) after a warm-up run, in ms per item; with
    ``concurrent``, of rounds in which ``CALIBRATION_CALLERS`` threads run at once."""
    b = feed_rows(feeds)
    run(feeds, None)  # warm-up (first runs at a new shape allocate)
    if concurrent and CALIBRATION_CALLERS > 1:
        return time_concurrent(run, feeds, CALIBRATION_CALLERS)
    best = math.inf
    runs = 0
    t_b = time.perf_counter()
    while runs < 3 or (time.perf_counter() - t_b < 0.05 and runs < 50):
        t0 = time.perf_counter()
        run(feeds, None)
        best = min(best, time.perf_counter() - t0)
        runs += 1
    return best * 1e3 / b


def time_concurrent(run: RunFn, feeds: Feeds, callers: int, threads: int | None = None) -> float:
    """ms per item of ``callers`` threads each making ``m`` runs at once: the fastest of >= 3 rounds.
    ``threads``: on a lane's runner with that many intra-op threads."""
    run(feeds, threads)  # warm-up (first runs at a new shape allocate)
    t0 = time.perf_counter()
    run(feeds, threads)
    m = max(2, min(100, int(0.004 / max(time.perf_counter() - t0, 1e-6))))  # rounds of ~4 ms or more
    best = math.inf
    rounds = 0
    with ThreadPoolExecutor(callers) as ex:
        t_b = time.perf_counter()
        while rounds < 3 or (time.perf_counter() - t_b < 0.1 and rounds < 20):
            t0 = time.perf_counter()
            for f in [ex.submit(lambda: [run(feeds, threads) for _ in range(m)]) for _ in range(callers)]:
                f.result()
            best = min(best, time.perf_counter() - t0)
            rounds += 1
    return best * 1e3 / (callers * m * feed_rows(feeds))


def _first_pass(sizes: Sequence[int], per_item_at: Callable[[int], float], until: float) -> dict[int, float]:
    """Per-item ms at each batch size, ascending; stops once a size costs 25% more per item than the best batch so far
    (compute-bound: bigger only gets worse) or at ``until`` (perf_counter)."""
    per_item: dict[int, float] = {}
    for b in sizes:
        per_item[b] = per_item_at(b)
        batched = [v for k, v in per_item.items() if k > 1]  # (batch 1 is timed differently)
        if (len(batched) > 1 and per_item[b] > 1.25 * min(batched)) or time.perf_counter() > until:
            break
    return per_item


def _second_pass(per_item: dict[int, float], per_item_at: Callable[[int], float], until: float) -> None:
    """Time each size again, descending, keeping its fastest, until ``until``."""
    for b in sorted(per_item, reverse=True):
        if time.perf_counter() > until:
            break
        per_item[b] = min(per_item[b], per_item_at(b))
