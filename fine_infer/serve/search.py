"""Concurrent ``/v1/search`` requests meet in one :meth:`Index.search` call.

A lone query scans the whole gallery for one row of scores (memory-bound: 10k x 256 float32 is 10 MB per query); a
batch of queries scans it once for all of them. Measured here on 10k random unit vectors, 256-d, 2 cores: 0.23 ms
for one query, 1.5 ms for 32 (0.05 ms a query). So the server hands its searches to one worker thread that takes
whatever has queued while the previous search ran (up to ``max_queries``) and runs it as one call. There is no
delay: a lone client's search runs at once, and under load the queue itself forms the batches.

Each request gets the first ``k`` columns of a search for the batch's largest ``k``: the index orders hits by score,
then storage slot, so a top-k is the prefix of any larger top-k — the answer is the one a direct
``index.search(vector, k)`` gives.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from typing import Any

import numpy as np

from fine_infer.runtime.batcher import call_in_each_loop

DEFAULT_MAX_QUERIES = 64


class SearchBatcher:
    """Batches searches of one index from asyncio callers (:meth:`search`); :meth:`close` drains the queue."""

    def __init__(self, index: Any, max_queries: int = DEFAULT_MAX_QUERIES) -> None:
        self.index = index
        self.max_queries = max(1, int(max_queries))
        self._cond = threading.Condition()
        self._queue: collections.deque = collections.deque()
        self._closed = False
        self._thread: threading.Thread | None = None

    async def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``index.search(vectors, k)``, run in a batch with whatever other searches are queued."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the search batcher is closed (the server is shutting down)")
            if self._thread is None:
                self._thread = threading.Thread(target=self._worker, name="search-batcher", daemon=True)
                self._thread.start()
            self._queue.append((vectors, k, loop, fut))
            if len(self._queue) == 1:  # the worker waits only when the queue is empty
                self._cond.notify()
        return await fut

    def _worker(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return  # closed and drained
                taken, rows = [], 0
                while self._queue and (not taken or rows + len(self._queue[0][0]) <= self.max_queries):
                    item = self._queue.popleft()
                    if not item[3].cancelled():  # the client went away: skip its search
                        taken.append(item)
                        rows += len(item[0])
            if taken:
                _answer(self._run(taken))

    def _run(self, taken: list) -> list:
        """Per request: (loop, future, (scores, ids) or None, exception or None)."""
        try:
            q = taken[0][0] if len(taken) == 1 else np.concatenate([t[0] for t in taken])
            scores, ids = self.index.search(q, max(t[1] for t in taken))
        except Exception:  # noqa: BLE001 - one bad request must not fail its batch-mates: run them one by one
            out = []
            for v, k, loop, fut in taken:
                try:
                    out.append((loop, fut, self.index.search(v, k), None))
                except Exception as exc:  # noqa: BLE001
                    out.append((loop, fut, None, exc))
            return out
        out, lo = [], 0
        for v, k, loop, fut in taken:
            hi = lo + len(v)
            out.append((loop, fut, (scores[lo:hi, :k], ids[lo:hi, :k]), None))
            lo = hi
        return out

    def close(self, timeout: float | None = 30.0) -> None:
        """Answer what is queued, then stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)


def _answer(results: list) -> None:
    """Resolve the futures: one call into each event loop per batch (one wake-up of the loop, not one per request)."""
    loops: dict[Any, list] = {}
    for r in results:
        loops.setdefault(r[0], []).append(r)
    call_in_each_loop(loops, _resolve)


def _resolve(items: list) -> None:
    for _, fut, value, exc in items:
        if not fut.done():  # done: cancelled meanwhile
            if exc is None:
                fut.set_result(value)
            else:
                fut.set_exception(exc)
