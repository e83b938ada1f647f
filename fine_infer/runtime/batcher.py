"""Dynamic batching across concurrent callers of one :class:`~fine_infer.runtime.session.Session`.

Callers hand in feeds that are already preprocessed (one or more rows each). Per graph, a worker thread takes
the queued requests up to ``max_batch_size`` rows, or whatever has arrived ``max_delay_ms`` after the oldest one,
runs them as one batch on the session's runner and answers every caller with its own rows. With several *lanes*
(one worker each) several batches of a graph are in the model at once, each on its share of the cores. The delay
is adaptive: the worker waits for company only when some is to be expected (several requests queued, or the
previous batch merged several), so a lone caller runs at once::

    batcher = DynamicBatcher(session)                 # max_batch_size calibrated per graph on first use
    fut = batcher.submit("text", {"input_ids": ids, "attention_mask": mask})
    out = fut.result()["embedding"]
    out = await batcher.run_async("text", feeds)       # the same from asyncio

Inputs with a ``sequence`` axis are padded to the batch's longest (ids with the manifest's ``pad_id``, masks with
0); a graph whose outputs follow that axis gets its rows cut back to each request's own length. A request that
fails fails alone: feeds are checked before they are queued, and if a batch run raises, its requests are re-run
one by one so only the bad one gets the exception. ``run_async(graph, feeds, texts=[...])`` leaves tokenizing to
the worker: one tokenizer call for the batch's texts, none on the caller's event loop.

What a request costs besides its share of the model is Python run under the GIL, one request after another, so it is
kept small: a blocking :meth:`DynamicBatcher.run` waits on a lock of its own that the worker releases (no
``Future``), asyncio callers are answered with one call into their loop per batch, and each caller gets views of
its own rows of the batch's outputs rather than copies.

Batching pays only where a graph is not compute-bound on this machine (a tiny text encoder runs ~2× cheaper per
item at batch 8-32 on a 2-core CPU; a ViT-S/16 runs *dearer* per item). So ``max_batch_size`` is measured per graph
(:meth:`DynamicBatcher.calibrate`: per-item cost at batch 1, 2, 4, ... 32) or read from a ``fine-infer bench``
JSON result (:meth:`DynamicBatcher.use_bench_result`), never guessed. With ``max_batch_size`` 1, :meth:`submit`
runs the graph in the caller's thread: it costs what a direct ``session.run`` costs. Calibration also times one
single-threaded lane per core (ONNX Runtime on a CPU): a tiny text encoder's batch of 16 on one thread does ~1.5x the
work per core of a batch of 32 on two, and two such lanes keep both cores busy while each lane's callers resubmit
(benchmarks/RESULTS.md, Serving).
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from fine_infer._cpu import cpu_cores
from fine_infer.errors import ConfigError, InputError
from fine_infer.runtime.base import check_feeds
from fine_infer.specs import GraphSpec, TextPreprocess

PAD_AXES = ("sequence",)  # dynamic axes the batcher may pad; any other differing dynamic axis splits the batch
CALIBRATION_BATCHES = (1, 2, 4, 8, 16, 32)
# Batch 1 is timed with this many callers at once: with max_batch_size 1 every caller runs the graph in its own
# thread, and concurrent runs share the cores better than one run alone does (a ViT-S-like graph: 17-19 ms per item
# with 8 callers on two cores, 21-25 ms with 2, 17 ms with 32 direct callers). That is what a batch has to beat.
CALIBRATION_CALLERS = max(1, min(8, 4 * (os.cpu_count() or 1)))
DEFAULT_MAX_DELAY_MS = 2.0
# A batch size is "as good as the best" within this margin; the smallest such size wins (shorter batches).
NEAR_BEST = 1.02
# Batching must save at least this much per item over (concurrent) batch-1 runs, or it is not used: a batch runs in
# one worker thread, and on a CPU shared with other processes that thread gets a smaller share than many callers'
# threads do. A ViT-S-like graph measured 9% cheaper per item at batch 2-8 in calibration and then served 15% fewer
# requests than direct calls on the shared 2-core box (benchmarks/RESULTS.md, Serving).
MIN_BATCH_GAIN = 1.15

Feeds = dict[str, np.ndarray]
BatchCallback = Callable[[str, int, int, float], None]


@dataclass
class Calibration:
    """What :meth:`DynamicBatcher.calibrate` measured for one graph: per-item ms by batch size, and the pick."""

    graph: str
    per_item_ms: dict[int, float]
    max_batch_size: int
    seconds: float
    source: str = "measured"  # or "bench:<file>" / "fixed"
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


class _Request:
    """One caller's request. Its answer reaches the caller one of three ways: a released lock (the blocking
    :meth:`DynamicBatcher.run`: the cheapest hand-off there is between threads), a concurrent Future
    (:meth:`DynamicBatcher.submit`) or an asyncio future on the caller's event loop (:meth:`DynamicBatcher.run_async`)."""

    __slots__ = ("feeds", "rows", "texts", "truncate", "enqueued", "future", "loop", "afut", "lock", "result",
                 "error", "abandoned")

    def __init__(self, feeds: Feeds, rows: int, future: Future | None = None,
                 loop: asyncio.AbstractEventLoop | None = None, afut: asyncio.Future | None = None,
                 texts: list[str] | None = None, truncate: bool = False) -> None:
        self.feeds = feeds
        self.rows = rows
        self.texts = texts  # to tokenize in the worker (with the batch's other texts) into input_ids/attention_mask
        self.truncate = truncate
        self.enqueued = time.perf_counter()
        self.future = future
        self.loop = loop
        self.afut = afut
        self.lock: threading.Lock | None = None
        if future is None and afut is None:
            self.lock = threading.Lock()
            self.lock.acquire()  # released by the worker once the answer is in
        self.result: Feeds | None = None
        self.error: BaseException | None = None
        self.abandoned = False  # a blocking caller that timed out

    def start(self) -> bool:
        """Called as the request is taken into a batch: False when its caller has given up (skip it)."""
        if self.future is not None:
            return self.future.set_running_or_notify_cancel()
        if self.afut is not None:
            return not self.afut.cancelled()  # a disconnected HTTP client's request is not run
        return not self.abandoned

    def wait(self, timeout: float | None) -> Feeds:
        """The blocking caller's side: this request's outputs, or its exception raised."""
        assert self.lock is not None
        if not self.lock.acquire(True, -1 if timeout is None else timeout):
            self.abandoned = True
            raise TimeoutError(f"no answer from the batcher within {timeout} s")
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


Answer = tuple[_Request, "Feeds | None", "BaseException | None"]


def _answer(answers: list[Answer]) -> None:
    """Hand every request its outputs or its exception. Requests from asyncio callers are resolved with one call
    per event loop (one wake-up of the loop for the whole batch, not one per request)."""
    loops: dict[asyncio.AbstractEventLoop, list[Answer]] = {}
    for a in answers:
        r, out, err = a
        if r.lock is not None:
            r.result, r.error = out, err
            r.lock.release()
        elif r.future is not None:
            if err is None:
                r.future.set_result(out)
            else:
                r.future.set_exception(err)
        else:
            loops.setdefault(r.loop, []).append(a)  # type: ignore[arg-type]
    call_in_each_loop(loops, _resolve_async)


def call_in_each_loop(groups: dict[Any, list], fn: Callable[[list], None]) -> None:
    """Call ``fn(items)`` once inside each event loop of ``groups`` (thread-safe): one wake-up of a loop per batch,
    not one per request. A closed loop is skipped: nobody is waiting on it any more."""
    for loop, items in groups.items():
        try:
            loop.call_soon_threadsafe(fn, items)
        except RuntimeError:
            pass


def _resolve_async(items: list[Answer]) -> None:
    for r, out, err in items:
        f = r.afut
        if f is not None and not f.done():  # done: cancelled meanwhile (the client went away)
            if err is None:
                f.set_result(out)
            else:
                f.set_exception(err)


@dataclass
class _GraphQueue:
    spec: GraphSpec
    cond: threading.Condition
    queue: collections.deque = field(default_factory=collections.deque)
    rows: int = 0  # rows waiting in the queue
    last_requests: int = 0  # requests merged into the previous batch
    threads: list[threading.Thread] = field(default_factory=list)  # one worker per lane


def pick_batch_size(per_item_ms: Mapping[int, float]) -> int:
    """The smallest batch size whose per-item cost is within 2% of the cheapest measured; but 1 (no batching) when
    no batch size saves at least ``MIN_BATCH_GAIN`` over batch 1, or nothing was measured."""
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
    smallest batch within 2% of the best, one lane on a tie. ``(1, 1)`` (no batching) when nothing saves at least
    ``MIN_BATCH_GAIN`` over batch 1."""
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


def bench_batch_sizes(result: Mapping[str, Any] | str | Path, backend: str) -> dict[str, int]:
    """Per graph, the batch size a ``fine-infer bench`` JSON result says is best for ``backend`` (items/s)."""
    if not isinstance(result, Mapping):
        try:
            result = json.loads(Path(result).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read bench result {result}: {exc}") from None
    rows = result.get("rows") if isinstance(result, Mapping) else None
    if not isinstance(rows, list):
        raise ConfigError("bench result has no 'rows' list; write one with `fine-infer bench BUNDLE --json FILE`")
    per_graph: dict[str, dict[int, float]] = {}
    for r in rows:
        if r.get("backend") == backend and r.get("mode", "runtime") == "runtime" and r.get("ms_per_item"):
            per_graph.setdefault(r["graph"], {})[int(r["batch"])] = float(r["ms_per_item"])
    return {g: pick_batch_size(v) for g, v in per_graph.items()}


class DynamicBatcher:
    """Groups concurrent requests per graph into batches (see the module docstring).

    ``max_batch_size``: an int for every graph, a mapping per graph, or None to calibrate each graph by measurement
    before its first batch (:meth:`calibrate` does it up front). ``max_delay_ms``: how long the oldest queued request
    may wait for company; with ``adaptive_delay`` (default) only when company is to be expected (several requests
    queued, or the previous batch merged several). ``on_batch(graph, rows, requests, seconds)`` is called after every
    batch run (metrics).

    ``lanes``: batches of a graph in the model at once, each from a worker thread of its own on a runner with
    ``threads // lanes`` intra-op threads (ONNX Runtime; ``threads``: the session's cap, else the cores). On a CPU,
    two single-threaded batches side by side do more work per core than one batch on two threads, and one lane's
    callers resubmit while the other lane runs. None: measured with the batch size (:meth:`calibrate` tries one lane
    and one single-threaded lane per thread), else 1. A fixed ``max_batch_size`` is per lane.
    """

    def __init__(
        self,
        session: Any,
        max_batch_size: int | Mapping[str, int] | None = None,
        max_delay_ms: float = DEFAULT_MAX_DELAY_MS,
        on_batch: BatchCallback | None = None,
        calibration_budget_s: float = 5.0,
        adaptive_delay: bool = True,
        lanes: int | None = None,
    ) -> None:
        if max_delay_ms < 0:
            raise ConfigError(f"max_delay_ms must be >= 0, got {max_delay_ms}")
        if lanes is not None:
            if not isinstance(lanes, int) or isinstance(lanes, bool) or lanes < 1:
                raise ConfigError(f"lanes must be a positive integer, got {lanes!r}")
            if lanes > 1 and getattr(session, "backend", None) != "onnxruntime":
                raise ConfigError(f"lanes > 1 need the onnxruntime backend (a runner per lane with its own threads); "
                                  f"this session runs on {getattr(session, 'backend', None)!r}: use lanes=1")
        self._fixed_lanes = lanes
        self._lanes: dict[str, int] = {}
        # Intra-op threads all lanes together may use: the session's cap (load(threads=...)), else one per core.
        # Read once: a lane's thread count is looked up for every batch.
        self._thread_budget = getattr(session, "threads", None) or cpu_cores()
        self.session = session
        self.max_delay_s = max_delay_ms / 1e3
        self.adaptive_delay = adaptive_delay
        self.on_batch = on_batch
        self.calibration_budget_s = calibration_budget_s
        self.calibrations: dict[str, Calibration] = {}
        self._sizes: dict[str, int] = {}
        self._default: int | None = None
        if isinstance(max_batch_size, Mapping):
            for g, n in max_batch_size.items():
                self._set_size(g, n, "fixed")
        elif max_batch_size is not None:
            self._check_size(max_batch_size)
            self._default = int(max_batch_size)
        manifest = session.manifest
        # Graphs whose inputs or outputs lack a leading batch axis cannot be merged: always one request per run.
        self._unbatchable = {g for g, e in manifest.graphs.items() if not _batchable(e.spec)}
        self._text: TextPreprocess | None = manifest.text
        self._pad_id = manifest.text.pad_id if manifest.text else 0
        self._queues: dict[str, _GraphQueue] = {}
        self._lock = threading.Lock()
        self._calib_lock = threading.Lock()
        self._closed = False

    # --- batch sizes --------------------------------------------------------------------------------------------
    @staticmethod
    def _check_size(n: int) -> None:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"max_batch_size must be a positive integer, got {n!r}")

    def _set_size(self, graph: str, n: int, source: str) -> None:
        self._check_size(n)
        self.session.bundle.graph(graph)  # unknown graphs are a BundleError naming the bundle's graphs
        self._sizes[graph] = int(n)
        self.calibrations.setdefault(graph, Calibration(graph, {}, int(n), 0.0, source))

    def lanes(self, graph: str) -> int:
        """Batches of ``graph`` run at once (see the class docstring)."""
        return self._lanes.get(graph, self._fixed_lanes or 1)

    def _lane_threads(self, graph: str) -> int | None:
        """Intra-op threads of a lane's runner; None: the session's own runner (one lane)."""
        n = self.lanes(graph)
        return None if n < 2 else max(1, self._thread_budget // n)

    def _can_use_lanes(self, graph: str) -> bool:
        """Lanes are measured only where they can pay: ONNX Runtime on a CPU, with two or more threads to share."""
        runner = getattr(self.session, "runner", None)  # (a stand-in session may have none)
        if getattr(self.session, "backend", None) != "onnxruntime" or runner is None:
            return False
        return self._thread_budget >= 2 and runner(graph).provider == "CPUExecutionProvider"

    def max_batch_size(self, graph: str) -> int | None:
        """The batch size in force for ``graph`` (None: not calibrated yet)."""
        if graph in self._unbatchable:
            return 1
        return self._sizes.get(graph, self._default)

    def use_bench_result(self, result: Mapping[str, Any] | str | Path) -> dict[str, int]:
        """Take each graph's batch size from a ``fine-infer bench`` JSON result for this session's backend."""
        sizes = bench_batch_sizes(result, self.session.backend)
        src = f"bench:{result}" if not isinstance(result, Mapping) else "bench"
        for g, n in sizes.items():
            if g in self.session.manifest.graphs:
                self._sizes[g] = n
                self.calibrations[g] = Calibration(g, {}, n, 0.0, src)
        return sizes

    def calibrate(
        self,
        graph: str,
        sample: Feeds | None = None,
        batch_sizes: Sequence[int] = CALIBRATION_BATCHES,
        budget_s: float | None = None,
    ) -> Calibration:
        """Measure per-item cost at each batch size (and number of lanes) and set ``graph``'s ``max_batch_size``
        and lanes to the cheapest per item (:func:`pick_plan`).

        ``sample`` (default: synthetic feeds) is repeated to each batch size. Each size gets a warm-up run, then
        at least 3 timed runs, in two passes (ascending, then descending); its fastest run counts. Batch 1 is timed
        as ``CALIBRATION_CALLERS`` concurrent callers (what unbatched requests get). The first pass
        stops early once a size costs 25% more per item than the best batch so far (compute-bound: bigger only gets
        worse) or its share of the time budget is spent. Where lanes can pay (ONNX Runtime on a CPU, a thread
        budget of two or more), one single-threaded lane per thread is timed too, at batch sizes up to the largest
        over the lanes; ``lanes`` fixed at construction are timed as they are.
        Graphs whose outputs do not follow the batch axis cannot be batched and get 1.
        """
        budget = self.calibration_budget_s if budget_s is None else budget_s
        spec = self.session.bundle.graph(graph).spec
        t_start = time.perf_counter()
        if not _batchable(spec):
            cal = Calibration(graph, {}, 1, 0.0, "unbatchable")
        else:
            if sample is None:
                sample = self._sample(spec)
            sizes = sorted(set(int(x) for x in batch_sizes))
            # Lanes: as fixed, else one per core where they can pay. Fixed lanes > 1 time the one lane at batch 1
            # only (the unbatched reference); lane batch sizes keep lanes * batch within the largest batch size.
            lanes = self._fixed_lanes or (self._thread_budget if self._can_use_lanes(graph) else 1)
            lane_threads = max(1, self._thread_budget // lanes)
            lane_sizes = [b for b in sizes if b > 1 and lanes * b <= sizes[-1]] if lanes > 1 else []
            if self._fixed_lanes and self._fixed_lanes > 1:
                sizes = [1]

            def single(b: int) -> float:  # batch 1 as concurrent callers: what unbatched requests get
                return self._time_per_item(graph, repeat_rows(sample, b), b == 1)

            def laned(b: int) -> float:
                return self._time_concurrent(graph, repeat_rows(sample, b), lanes, lane_threads)

            with self._calib_lock:  # two graphs measured at once would disturb each other's timings
                # Two passes, ascending then descending, keeping each size's fastest run: a noisy neighbour on a
                # shared CPU only ever adds time, and a drift during the first pass is not mistaken for a trend.
                share = budget / (3 if lane_sizes else 2)
                per_item = _first_pass(sizes, single, t_start + share)
                lane_per_item = _first_pass(lane_sizes, laned, t_start + 2 * share) if lane_sizes else {}
                _second_pass(per_item, single, t_start + (budget + 2 * share) / 2 if lane_sizes else t_start + budget)
                _second_pass(lane_per_item, laned, t_start + budget)
                n_lanes, picked = pick_plan(per_item, lane_per_item, lanes)
            if lane_sizes and n_lanes == 1 and hasattr(self.session, "release_runner"):
                self.session.release_runner(graph, lane_threads)  # tried, not kept
            cal = Calibration(graph, per_item, picked, time.perf_counter() - t_start, lanes=n_lanes,
                              lane_per_item_ms=lane_per_item)
        self._lanes[graph] = cal.lanes
        self._sizes[graph] = cal.max_batch_size
        self.calibrations[graph] = cal
        return cal

    def warm_up(self, graph: str) -> None:
        """Run ``graph`` once on synthetic feeds on every runner its batches use (first runs allocate, and a lane's
        runner is created on first use): a cost for start-up, not for the first client."""
        sample = self._sample(self.session.bundle.graph(graph).spec)
        self._run(graph, sample)
        if self.lanes(graph) > 1:
            self._run(graph, sample, self._lane_threads(graph))

    def _run(self, graph: str, feeds: Feeds, threads: int | None = None) -> Feeds:
        """One model run, on a lane's runner when ``threads`` is given."""
        if threads is None:
            return self.session.run(graph, feeds)
        return self.session.run(graph, feeds, threads=threads)

    def _sample(self, spec: GraphSpec) -> Feeds:
        """One row of synthetic feeds for timing ``spec`` (valid token ids for the bundle's tokenizer)."""
        vocab = None
        if self._text is not None and getattr(self.session, "tokenizer", None) is not None:
            vocab = self.session.tokenizer.get_vocab_size(with_added_tokens=True)
        return example_feeds(spec, 1, self._text, vocab)

    def _time_per_item(self, graph: str, feeds: Feeds, concurrent: bool = False) -> float:
        """Fastest of >= 3 runs (and >= 0.05 s, at most 50 runs) after a warm-up run, in ms per item; with
        ``concurrent``, of rounds in which ``CALIBRATION_CALLERS`` threads run at once."""
        b = _rows(feeds)
        self.session.run(graph, feeds)  # warm-up (first runs at a new shape allocate)
        if concurrent and CALIBRATION_CALLERS > 1:
            return self._time_concurrent(graph, feeds, CALIBRATION_CALLERS)
        best = math.inf
        runs = 0
        t_b = time.perf_counter()
        while runs < 3 or (time.perf_counter() - t_b < 0.05 and runs < 50):
            t0 = time.perf_counter()
            self.session.run(graph, feeds)
            best = min(best, time.perf_counter() - t0)
            runs += 1
        return best * 1e3 / b

    def _time_concurrent(self, graph: str, feeds: Feeds, callers: int, threads: int | None = None) -> float:
        """ms per item of ``callers`` threads each making ``m`` runs at once: the fastest of >= 3 rounds.
        ``threads``: on the session's runner with that many intra-op threads (a lane's)."""
        self._run(graph, feeds, threads)  # warm-up (first runs at a new shape allocate)
        t0 = time.perf_counter()
        self._run(graph, feeds, threads)
        m = max(2, min(100, int(0.004 / max(time.perf_counter() - t0, 1e-6))))  # rounds of ~4 ms or more
        best = math.inf
        rounds = 0
        with ThreadPoolExecutor(callers) as ex:
            t_b = time.perf_counter()
            while rounds < 3 or (time.perf_counter() - t_b < 0.1 and rounds < 20):
                t0 = time.perf_counter()
                for f in [ex.submit(lambda: [self._run(graph, feeds, threads) for _ in range(m)])
                          for _ in range(callers)]:
                    f.result()
                best = min(best, time.perf_counter() - t0)
                rounds += 1
        return best * 1e3 / (callers * m * _rows(feeds))

    def calibrate_all(self, budget_s: float | None = None) -> dict[str, Calibration]:
        """Calibrate every graph of the bundle that has no batch size yet."""
        for g in self.session.manifest.graphs:
            if self.max_batch_size(g) is None:
                self.calibrate(g, budget_s=budget_s)
        return {g: self.calibrations[g] for g in self.session.manifest.graphs if g in self.calibrations}

    # --- submitting ---------------------------------------------------------------------------------------------
    def submit(self, graph: str, feeds: Feeds) -> Future:
        """Queue ``feeds`` for ``graph``; the future resolves to this request's outputs (its own rows only).

        Bad feeds (names, dtypes, shapes, NaN) fail the returned future at once and never reach a batch. With a
        ``max_batch_size`` of 1 the graph runs in the calling thread, exactly like a direct ``session.run``.
        """
        fut: Future = Future()
        if self.max_batch_size(graph) == 1 and not self._closed:
            fut.set_running_or_notify_cancel()
            try:
                fut.set_result(self.session.run(graph, feeds))
            except Exception as exc:  # noqa: BLE001 - the caller gets its own exception through the future
                fut.set_exception(exc)
            return fut
        try:
            self._enqueue(graph, feeds, future=fut)
        except Exception as exc:  # noqa: BLE001 - a bad request fails alone, before it can join a batch
            fut.set_exception(exc)
        return fut

    def run(self, graph: str, feeds: Feeds, timeout: float | None = None) -> Feeds:
        """Blocking :meth:`submit`: this request's outputs (raises its exception; TimeoutError after ``timeout``)."""
        if self.max_batch_size(graph) == 1 and not self._closed:
            return self.session.run(graph, feeds)
        return self._enqueue(graph, feeds).wait(timeout)

    async def run_async(self, graph: str, feeds: Feeds, *, texts: Sequence[str] | None = None,
                        truncate: bool = False) -> Feeds:
        """From asyncio: queue ``feeds`` (always to the worker thread, never blocking the event loop) and await.

        ``texts``: strings for the graph's ``input_ids`` / ``attention_mask``, tokenized in the worker together
        with the rest of the batch's texts (one tokenizer call per batch, and none on the event loop, where each
        call gives up the GIL and must win it back). ``feeds`` then holds the other inputs, if any."""
        loop = asyncio.get_running_loop()
        afut = loop.create_future()
        self._enqueue(graph, feeds, loop=loop, afut=afut, texts=None if texts is None else list(texts),
                      truncate=truncate)
        return await afut

    def queue_depth(self, graph: str | None = None) -> int:
        """Requests waiting (for one graph, or all)."""
        qs = [self._queues[graph]] if graph in self._queues else ([] if graph else list(self._queues.values()))
        return sum(len(q.queue) for q in qs)

    def graphs(self) -> list[str]:
        """Graphs that have a worker."""
        return list(self._queues)

    def _enqueue(self, graph: str, feeds: Feeds, **how: Any) -> _Request:
        """Check ``feeds`` (raising for bad ones: they never join a batch) and queue them; ``how``: the answer's way."""
        if self._closed:
            raise RuntimeError("the batcher is closed (the server is shutting down)")
        q = self._queue(graph)
        texts = how.get("texts")
        if texts is None:
            checked = check_feeds(q.spec, feeds)
            rows = _rows(checked)
        else:  # checked in the worker once tokenized, before the request joins a batch
            if not texts or not all(isinstance(t, str) for t in texts):
                raise InputError("texts must be a non-empty list of strings")
            checked, rows = dict(feeds), len(texts)
        req = _Request(checked, rows, **how)
        limit = self.max_batch_size(graph)
        with q.cond:
            was_empty = not q.queue
            q.queue.append(req)
            q.rows += rows
            # Wake the worker only when it has something new to do: a first request to wait on, or a full batch.
            # Waking it on every request costs a thread switch each, which is most of a tiny model's cost.
            if was_empty or limit is None or q.rows >= limit:
                q.cond.notify()
        return req

    def _queue(self, graph: str) -> _GraphQueue:
        q = self._queues.get(graph)
        if q is not None:
            return q
        with self._lock:
            if graph not in self._queues:
                spec = self.session.bundle.graph(graph).spec
                q = _GraphQueue(spec, threading.Condition())
                self._queues[graph] = q
                self._add_worker(graph, q)
            return self._queues[graph]

    def _add_worker(self, graph: str, q: _GraphQueue) -> None:
        t = threading.Thread(target=self._worker, args=(graph, q), name=f"batcher-{graph}-{len(q.threads)}",
                             daemon=True)
        q.threads.append(t)
        t.start()

    def _start_lanes(self, graph: str, q: _GraphQueue) -> None:
        """One worker per lane (the first is started with the queue; the others once the lanes are known)."""
        if len(q.threads) < self.lanes(graph):
            with self._lock:
                while len(q.threads) < self.lanes(graph) and not self._closed:
                    self._add_worker(graph, q)

    # --- the worker ---------------------------------------------------------------------------------------------
    def _worker(self, graph: str, q: _GraphQueue) -> None:
        while True:
            taken = self._take(graph, q)
            if taken is None:
                return  # closed and drained
            if any(r.texts is not None for r in taken):
                failed: list[Answer] = []
                taken = self._tokenize(q.spec, taken, failed)
                _answer(failed)
            for group in _groups(q.spec, taken) if taken else []:
                # Each run's callers are answered as soon as it is done: they resubmit while the next run is in
                # the model (which releases the GIL), instead of all waking at once after the last run.
                t0 = time.perf_counter()
                _answer(self._run_group(graph, q.spec, group))
                if self.on_batch is not None:
                    try:
                        self.on_batch(graph, sum(r.rows for r in group), len(group), time.perf_counter() - t0)
                    except Exception:  # noqa: BLE001 - metrics must never break serving
                        pass

    def _take(self, graph: str, q: _GraphQueue) -> list[_Request] | None:
        """The next batch: waits for a first request, then (adaptive delay) for company; None once closed and empty."""
        with q.cond:
            while not q.queue and not self._closed:
                q.cond.wait()
            if not q.queue:
                return None
        limit = self.max_batch_size(graph)
        if limit is None:
            try:
                limit = self.calibrate(graph).max_batch_size
            except Exception:  # noqa: BLE001 - never let calibration kill the worker; run unbatched
                limit = 1
                self._sizes[graph] = 1
        self._start_lanes(graph, q)
        taken: list[_Request] = []
        with q.cond:
            if q.queue:
                deadline = q.queue[0].enqueued + self.max_delay_s
                # Wait for batch-mates only when there is company to expect: more than one request queued, or the
                # previous batch merged several. A lone caller (e.g. one client) never pays the delay.
                expect_company = not self.adaptive_delay or len(q.queue) > 1 or q.last_requests > 1
                while expect_company and q.rows < limit and not self._closed:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    q.cond.wait(left)
            rows = 0
            while q.queue and (not taken or rows + q.queue[0].rows <= limit):
                r = q.queue.popleft()
                q.rows -= r.rows
                if r.start():
                    taken.append(r)
                    rows += r.rows
            if taken:
                q.last_requests = len(taken)
        return taken

    def _tokenize(self, spec: GraphSpec, reqs: list[_Request], failed: list[Answer]) -> list[_Request]:
        """Tokenize the requests' texts (one call for the batch; one per request if that call fails, so a bad text
        fails alone), check their feeds, and return the requests ready to run (the others' errors go to ``failed``).
        Each request's rows keep the width a direct ``session.tokenize`` of its own texts gives."""
        ready = [r for r in reqs if r.texts is None]
        pad_to_max = self._text is not None and self._text.padding == "max_length"
        for flag in (False, True):
            group = [r for r in reqs if r.texts is not None and r.truncate == flag]
            if not group:
                continue
            parts = []
            try:
                ids, mask = self.session.tokenize([t for r in group for t in r.texts], truncate=flag)
                lo = 0
                for r in group:
                    parts.append((r, ids[lo:lo + r.rows], mask[lo:lo + r.rows]))
                    lo += r.rows
            except Exception:  # noqa: BLE001 - find the culprit: one call per request
                for r in group:
                    try:
                        parts.append((r, *self.session.tokenize(r.texts, truncate=flag)))
                    except Exception as exc:  # noqa: BLE001
                        failed.append((r, None, exc))
            for r, i, m in parts:
                if not pad_to_max:
                    width = int(m.sum(axis=1).max())
                    i, m = i[:, :width], m[:, :width]
                try:
                    r.feeds = check_feeds(spec, {**r.feeds, "input_ids": i, "attention_mask": m})
                except Exception as exc:  # noqa: BLE001
                    failed.append((r, None, exc))
                else:
                    ready.append(r)
        return ready

    def _run_group(self, graph: str, spec: GraphSpec, group: list[_Request]) -> list[Answer]:
        """Run ``group`` as one batch (one by one if that fails, so only a bad request gets an exception)."""
        if len(group) == 1:
            return [self._run_one(graph, group[0])]
        try:
            merged, lengths = self._merge(spec, group)
            out = self._run(graph, merged, self._lane_threads(graph))
        except Exception:  # noqa: BLE001 - find the culprit: re-run one by one, each gets its own answer
            return [self._run_one(graph, r) for r in group]
        answers: list[Answer] = []
        _split(spec, out, group, lengths, answers)
        return answers

    def _run_one(self, graph: str, r: _Request) -> Answer:
        try:
            return r, self._run(graph, r.feeds, self._lane_threads(graph)), None
        except Exception as exc:  # noqa: BLE001
            return r, None, exc

    def _merge(self, spec: GraphSpec, reqs: list[_Request]) -> tuple[Feeds, dict[str, list[int]]]:
        merged: Feeds = {}
        lengths: dict[str, list[int]] = {}  # per padded axis name: each request's own size
        total = sum(r.rows for r in reqs)
        for t in spec.inputs:
            arrays = [r.feeds[t.name] for r in reqs]
            pad_dims = [i for i, d in enumerate(t.shape) if i > 0 and d in PAD_AXES]
            shape = list(arrays[0].shape)
            shape[0] = total
            for i in pad_dims:
                shape[i] = max(a.shape[i] for a in arrays)
                lengths.setdefault(t.shape[i], [a.shape[i] for a in arrays])
            if pad_dims and any(a.shape[i] != shape[i] for a in arrays for i in pad_dims):
                value = 0 if "mask" in t.name.lower() else self._pad_id
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

    def close(self, drain: bool = True, timeout: float | None = 30.0) -> None:
        """Stop the workers. ``drain``: answer every queued request first; else fail them (RuntimeError)."""
        self._closed = True
        for q in list(self._queues.values()):
            failed: list[Answer] = []
            with q.cond:
                if not drain:
                    while q.queue:
                        r = q.queue.popleft()
                        if r.start():
                            failed.append((r, None, RuntimeError("the batcher was closed before this request ran")))
                    q.rows = 0
                q.cond.notify_all()
            _answer(failed)
        for q in list(self._queues.values()):
            for t in list(q.threads):
                t.join(timeout)

    def __enter__(self) -> "DynamicBatcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _rows(feeds: Feeds) -> int:
    for v in feeds.values():
        return int(v.shape[0])
    raise InputError("no inputs given")


def _batchable(spec: GraphSpec) -> bool:
    """A graph can be batched when every input and output has the dynamic ``batch`` axis first."""
    return all(t.shape and isinstance(t.shape[0], str) for t in (*spec.inputs, *spec.outputs))


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


def _groups(spec: GraphSpec, reqs: list[_Request]) -> list[list[_Request]]:
    """Split requests by the sizes of dynamic axes that may not be padded (they must match to concatenate)."""
    fixed = [(t.name, i) for t in spec.inputs for i, d in enumerate(t.shape) if i > 0 and isinstance(d, str)
             and d not in PAD_AXES]
    if not fixed:
        return [reqs]
    groups: dict[tuple, list[_Request]] = {}
    for r in reqs:
        groups.setdefault(tuple(r.feeds[n].shape[i] for n, i in fixed), []).append(r)
    return list(groups.values())


def _split(spec: GraphSpec, out: Feeds, reqs: list[_Request], lengths: dict[str, list[int]],
           answers: list[Answer]) -> None:
    """Each request's own rows of the batch's outputs: views (the rows are disjoint, so no caller sees another's
    writes; a copy per request costs more than a tiny model's share of the run), cut back to the request's own
    length along a padded axis."""
    lo = 0
    for k, r in enumerate(reqs):
        hi = lo + r.rows
        mine: Feeds = {}
        for t in spec.outputs:
            arr = out[t.name][lo:hi]
            for i, d in enumerate(t.shape):
                if i > 0 and d in lengths:  # an output that follows a padded axis
                    arr = arr[(slice(None),) * i + (slice(0, lengths[d][k]),)]
            mine[t.name] = arr
        answers.append((r, mine, None))
        lo = hi
