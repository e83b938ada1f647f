"""Dynamic batching across concurrent callers of one :class:`~fine_infer.runtime.session.Session`.

Callers hand in feeds that are already preprocessed (one or more rows each). Per graph, a worker thread takes the
queued requests up to ``max_batch_size`` rows, or whatever has arrived ``max_delay_ms`` after the oldest one, runs
them as one batch on the session's runner and answers every caller with its own rows (the queue and its workers:
:mod:`fine_infer.batching.queue`; merging, padding and splitting: :mod:`fine_infer.batching.merging`). With several
*lanes* (one worker each) several batches of a graph are in the model at once, each on its share of the cores::

    batcher = DynamicBatcher(session)                 # max_batch_size calibrated per graph on first use
    fut = batcher.submit("text", {"input_ids": ids, "attention_mask": mask})
    out = fut.result()["embedding"]
    out = await batcher.run_async("text", feeds)       # the same from asyncio

A request that fails fails alone: feeds are checked before they are queued, and if a batch run raises, its requests
are re-run one by one so only the bad one gets the exception. ``run_async(graph, feeds, texts=[...])`` leaves
tokenizing to the worker: one tokenizer call for the batch's texts, none on the caller's event loop.

What a request costs besides its share of the model is Python run under the GIL, one request after another, so it is
kept small: a blocking :meth:`DynamicBatcher.run` waits on a lock of its own that the worker releases (no
``Future``), asyncio callers are answered with one call into their loop per batch, and each caller gets views of
its own rows of the batch's outputs rather than copies.

Batching pays only where a graph is not compute-bound on this machine, so ``max_batch_size`` and the lanes are
measured per graph (:meth:`DynamicBatcher.calibrate`, :mod:`fine_infer.batching.calibration`) or given in the
:class:`~fine_infer.batching.settings.BatchSettings`, never guessed. With ``max_batch_size`` 1, :meth:`submit` runs
the graph in the caller's thread: it costs what a direct ``session.run`` costs.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future
from functools import partial
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from fine_infer._cpu import cpu_cores
from fine_infer.batching import calibration, merging
from fine_infer.batching.calibration import CALIBRATION_BATCHES, Calibration
from fine_infer.batching.queue import Answer, Request, WorkQueue, answer
from fine_infer.batching.settings import BatchSettings
from fine_infer.errors import ConfigError, InputError
from fine_infer.runtime.base import check_feeds
from fine_infer.runtime.feeds import example_feeds
from fine_infer.specs import GraphSpec

Feeds = dict[str, np.ndarray]
BatchCallback = Callable[[str, int, int, float], None]


class _Request(Request):
    """A model request: its feeds, or texts to tokenize in the worker (with the batch's other texts)."""

    __slots__ = ("feeds", "texts", "truncate")

    def __init__(self, feeds: Feeds, rows: int, texts: list[str] | None = None, truncate: bool = False,
                 **how: Any) -> None:
        super().__init__(rows, **how)
        self.feeds = feeds
        self.texts = texts
        self.truncate = truncate


class DynamicBatcher:
    """Groups concurrent requests per graph into batches (see the module docstring), as ``settings`` say
    (:class:`~fine_infer.batching.settings.BatchSettings`; default: calibrated sizes, a 2 ms adaptive delay).

    ``on_batch(graph, rows, requests, seconds)`` is called after every batch run (metrics).

    Lanes: batches of a graph in the model at once, each from a worker thread of its own on a runner with
    ``threads // lanes`` intra-op threads (ONNX Runtime; ``threads``: the session's cap, else the cores). On a CPU,
    two single-threaded batches side by side can do more work per core than one batch on two threads, and one lane's
    callers resubmit while the other lane runs. Unless fixed in the settings they are measured with the batch size
    (:meth:`calibrate` tries one lane and one single-threaded lane per thread), else 1. A fixed ``max_batch_size`` is
    per lane.
    """

    def __init__(self, session: Any, settings: BatchSettings | None = None,
                 on_batch: BatchCallback | None = None) -> None:
        s = self.settings = settings if settings is not None else BatchSettings()
        if s.lanes is not None and s.lanes > 1 and getattr(session, "backend", None) != "onnxruntime":
            raise ConfigError(f"lanes > 1 need the onnxruntime backend (a runner per lane with its own threads); "
                              f"this session runs on {getattr(session, 'backend', None)!r}: use lanes=1")
        self._lanes: dict[str, int] = {}
        # Intra-op threads all lanes together may use: the session's cap (load(threads=...)), else one per core.
        # Read once: a lane's thread count is looked up for every batch.
        self._thread_budget = getattr(session, "threads", None) or cpu_cores()
        self.session = session
        self.on_batch = on_batch
        self.calibrations: dict[str, Calibration] = {}
        self._sizes: dict[str, int] = {}
        self._default: int | None = None
        if isinstance(s.max_batch_size, Mapping):
            for g, n in s.max_batch_size.items():
                session.bundle.graph(g)  # unknown graphs are a BundleError naming the bundle's graphs
                self._sizes[g] = n
                self.calibrations[g] = Calibration(g, {}, n, 0.0, s.size_source)
        else:
            self._default = s.max_batch_size
        manifest = session.manifest
        # Graphs whose inputs or outputs lack a leading batch axis cannot be merged: always one request per run.
        self._unbatchable = {g for g, e in manifest.graphs.items() if not merging.batchable(e.spec)}
        self._text = manifest.text
        self._pad_id = manifest.text.pad_id if manifest.text else 0
        self._queues: dict[str, WorkQueue] = {}
        self._specs: dict[str, GraphSpec] = {}
        self._lock = threading.Lock()
        self._calib_lock = threading.Lock()
        self._closed = False

    # --- batch sizes and lanes ----------------------------------------------------------------------------------
    def max_batch_size(self, graph: str) -> int | None:
        """The batch size in force for ``graph`` (None: not calibrated yet)."""
        if graph in self._unbatchable:
            return 1
        return self._sizes.get(graph, self._default)

    def lanes(self, graph: str) -> int:
        """Batches of ``graph`` run at once (see the class docstring)."""
        return self._lanes.get(graph, self.settings.lanes or 1)

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

    def calibrate(self, graph: str, sample: Feeds | None = None, batch_sizes: Sequence[int] = CALIBRATION_BATCHES,
                  budget_s: float | None = None) -> Calibration:
        """Measure per-item cost at each batch size (and number of lanes) and set ``graph``'s ``max_batch_size``
        and lanes to the cheapest per item (:func:`fine_infer.batching.calibration.calibrate`).

        ``sample`` (default: synthetic feeds) is repeated to each batch size; ``budget_s`` defaults to the settings'
        ``calibration_budget_s``. Where lanes can pay (ONNX Runtime on a CPU, a thread budget of two or more), one
        single-threaded lane per thread is timed too; lanes fixed in the settings are timed as they are. Graphs
        whose outputs do not follow the batch axis cannot be batched and get 1.
        """
        budget = self.settings.calibration_budget_s if budget_s is None else budget_s
        spec = self.session.bundle.graph(graph).spec
        t_start = time.perf_counter()
        if not merging.batchable(spec):
            cal = Calibration(graph, {}, 1, 0.0, "unbatchable")
        else:
            if sample is None:
                sample = self._sample(spec)
            fixed = self.settings.lanes
            lanes = fixed or (self._thread_budget if self._can_use_lanes(graph) else 1)
            lane_threads = max(1, self._thread_budget // lanes)
            with self._calib_lock:  # two graphs measured at once would disturb each other's timings
                cal = calibration.calibrate(graph, partial(self._run, graph), sample, batch_sizes, budget,
                                            lanes=lanes, lane_threads=lane_threads, fixed_lanes=fixed is not None,
                                            start=t_start)
            if cal.lane_per_item_ms and cal.lanes == 1 and hasattr(self.session, "release_runner"):
                self.session.release_runner(graph, lane_threads)  # tried, not kept
        self._lanes[graph] = cal.lanes
        self._sizes[graph] = cal.max_batch_size
        self.calibrations[graph] = cal
        return cal

    def calibrate_all(self, budget_s: float | None = None) -> dict[str, Calibration]:
        """Calibrate every graph of the bundle that has no batch size yet."""
        for g in self.session.manifest.graphs:
            if self.max_batch_size(g) is None:
                self.calibrate(g, budget_s=budget_s)
        return {g: self.calibrations[g] for g in self.session.manifest.graphs if g in self.calibrations}

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
        return sum(len(q) for q in qs)

    def graphs(self) -> list[str]:
        """Graphs that have a worker."""
        return list(self._queues)

    def _enqueue(self, graph: str, feeds: Feeds, texts: list[str] | None = None, truncate: bool = False,
                 **how: Any) -> _Request:
        """Check ``feeds`` (raising for bad ones: they never join a batch) and queue them; ``how``: the answer's way."""
        if self._closed:
            raise RuntimeError("the batcher is closed (the server is shutting down)")
        q = self._queue(graph)
        if texts is None:
            checked = check_feeds(self._specs[graph], feeds)
            rows = merging.feed_rows(checked)
        else:  # checked in the worker once tokenized, before the request joins a batch
            if not texts or not all(isinstance(t, str) for t in texts):
                raise InputError("texts must be a non-empty list of strings")
            checked, rows = dict(feeds), len(texts)
        req = _Request(checked, rows, texts, truncate, **how)
        q.put(req)
        return req

    def _queue(self, graph: str) -> WorkQueue:
        q = self._queues.get(graph)
        if q is not None:
            return q
        with self._lock:
            if graph not in self._queues:
                self._specs[graph] = self.session.bundle.graph(graph).spec
                self._queues[graph] = WorkQueue(
                    f"batcher-{graph}", partial(self._handle, graph), partial(self.max_batch_size, graph),
                    prepare=partial(self._prepare, graph), max_delay_s=self.settings.max_delay_s,
                    adaptive_delay=self.settings.adaptive_delay,
                    closed_message="the batcher is closed (the server is shutting down)")
            return self._queues[graph]

    # --- the worker ---------------------------------------------------------------------------------------------
    def _prepare(self, graph: str) -> int:
        """Before a batch: the graph's batch size (calibrated on first use) and one worker per lane."""
        limit = self.max_batch_size(graph)
        if limit is None:
            try:
                limit = self.calibrate(graph).max_batch_size
            except Exception:  # noqa: BLE001 - never let calibration kill the worker; run unbatched
                limit = 1
                self._sizes[graph] = 1
        self._queues[graph].ensure_workers(self.lanes(graph))
        return limit

    def _handle(self, graph: str, taken: list[_Request]) -> None:
        """Run a batch the queue took: tokenize its texts, run it (in groups that can be concatenated), answer."""
        spec = self._specs[graph]
        if any(r.texts is not None for r in taken):
            failed: list[Answer] = []
            taken = self._tokenize(spec, taken, failed)
            answer(failed)
        for group in merging.length_groups(spec, merging.groups(spec, taken)) if taken else []:
            # Each run's callers are answered as soon as it is done: they resubmit while the next run is in the
            # model (which releases the GIL), instead of all waking at once after the last run.
            t0 = time.perf_counter()
            answer(self._run_group(graph, spec, group))
            if self.on_batch is not None:
                try:
                    self.on_batch(graph, sum(r.rows for r in group), len(group),
                                  time.perf_counter() - t0)
                except Exception:  # noqa: BLE001 - metrics must never break serving
                    pass

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
            merged, lengths = merging.merge(spec, [r.feeds for r in group], self._pad_id)
            out = self._run(graph, merged, self._lane_threads(graph))
        except Exception:  # noqa: BLE001 - find the culprit: re-run one by one, each gets its own answer
            return [self._run_one(graph, r) for r in group]
        parts = merging.split(spec, out, [r.rows for r in group], lengths)
        return [(r, mine, None) for r, mine in zip(group, parts)]

    def _run_one(self, graph: str, r: _Request) -> Answer:
        """Run one request; one larger than the batch size runs in batch-size slices, and stops between them once its
        caller has gone (a request past its time would otherwise hold the lane for its whole length)."""
        limit = self.max_batch_size(graph) or r.rows
        threads = self._lane_threads(graph)
        try:
            if r.rows <= limit or graph in self._unbatchable:
                return r, self._run(graph, r.feeds, threads), None
            parts = []
            for lo in range(0, r.rows, limit):
                if parts and not r.wanted():
                    return r, None, RuntimeError("the caller went away")  # answered to nobody
                parts.append(self._run(graph, {k: v[lo:lo + limit] for k, v in r.feeds.items()}, threads))
            return r, {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, None
        except Exception as exc:  # noqa: BLE001
            return r, None, exc

    def close(self, drain: bool = True, timeout: float | None = 30.0) -> None:
        """Stop the workers. ``drain``: answer every queued request first; else fail them (RuntimeError)."""
        self._closed = True
        with self._lock:
            queues = list(self._queues.values())
        for q in queues:
            q.close(drain)
        for q in queues:
            q.join(timeout)

    def __enter__(self) -> "DynamicBatcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
