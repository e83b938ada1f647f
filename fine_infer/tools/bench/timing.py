"""How one bench cell is timed: a time budget, warm-up then timed runs, and latency percentiles."""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np


def interleaved_ms(fns: Mapping[str, Callable[[], object]], rounds: int = 7, repeats: int = 3,
                   warmup: int = 2) -> dict[str, list[float]]:
    """Per name, the median wall time (ms) of ``repeats`` calls of its function in each of ``rounds`` rounds.

    Every round runs every function in turn, so a change in background load falls on all of them alike: compare
    them round by round (ratios) and report medians over rounds, never one run against another run minutes apart."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            out[name].append(statistics.median(times))
    return out


@dataclass(frozen=True)
class Budget:
    """How long one cell (graph × backend × batch) is timed: stop at ``max_runs`` or ``max_time_s`` (after at
    least 3 runs), or once both ``min_runs`` and ``min_time_s`` are reached."""

    warmup_runs: int = 3
    min_runs: int = 10
    min_time_s: float = 0.5
    max_runs: int = 200
    max_time_s: float = 5.0

    def done(self, runs: int, elapsed: float) -> bool:
        """Whether timing may stop after ``runs`` runs and ``elapsed`` seconds."""
        return (runs >= self.max_runs or (elapsed >= self.max_time_s and runs >= 3)
                or (runs >= self.min_runs and elapsed >= self.min_time_s))


QUICK = Budget(warmup_runs=2, min_runs=5, min_time_s=0.1, max_runs=50, max_time_s=1.0)


def latency_stats(times_s: Sequence[float], batch: int) -> dict[str, float]:
    """p50/p90/p99/mean latency (ms), ms per item and items/s of runs of ``batch`` items each."""
    t = np.asarray(times_s, dtype=np.float64) * 1e3
    mean = float(t.mean())
    return {"runs": int(t.size), "p50_ms": float(np.percentile(t, 50)), "p90_ms": float(np.percentile(t, 90)),
            "p99_ms": float(np.percentile(t, 99)), "mean_ms": mean, "ms_per_item": mean / batch,
            "items_per_s": batch * 1e3 / mean}


def time_cell(fn: Callable[[], object], budget: Budget) -> list[float]:
    for _ in range(budget.warmup_runs):
        fn()
    times: list[float] = []
    t_start = time.perf_counter()
    while not budget.done(len(times), time.perf_counter() - t_start):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


class Progress:
    """tqdm on stderr when installed, else one rewritten stderr line; silent when disabled."""

    def __init__(self, total: int, enabled: bool, desc: str) -> None:
        self.enabled, self.total, self.n, self.desc = enabled, total, 0, desc
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, label: str) -> None:
        """One more cell done; ``label`` names the next."""
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=False)
            self.bar.update(1)
        elif self.enabled:
            print(f"\r{self.desc} {self.n}/{self.total} {label:<40}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Remove the bar (or end the line)."""
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr)
