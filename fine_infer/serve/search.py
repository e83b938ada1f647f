"""Concurrent ``/v1/search`` requests meet in one :meth:`Index.search` call.

A lone query scans the whole gallery for one row of scores (memory-bound), while a batch of queries scans it once for
all of them, at a fraction of the cost per query (benchmarks/RESULTS.md, Search). So the server hands its searches to
one worker thread (:class:`~fine_infer.batching.queue.WorkQueue`, the batcher's core) that takes whatever has queued
while the previous search ran (up to ``max_queries``) and runs it as one call. There is no delay: a lone client's
search runs at once, and under load the queue itself forms the batches.

Each request gets the first ``k`` columns of a search for the batch's largest ``k``: the index orders hits by score,
then storage slot, so a top-k is the prefix of any larger top-k — the answer is the one a direct
``index.search(vector, k)`` gives.
"""

from __future__ import annotations

import asyncio
import posixpath
from typing import Any

import numpy as np

from fine_infer.batching.queue import Answer, Request, WorkQueue, answer
from fine_infer.batching.settings import DEFAULT_SEARCH_MAX_QUERIES


class _Search(Request):
    """One request's query rows and its ``k``."""

    __slots__ = ("vectors", "k")

    def __init__(self, vectors: np.ndarray, k: int, loop: asyncio.AbstractEventLoop, afut: asyncio.Future) -> None:
        super().__init__(len(vectors), loop=loop, afut=afut)
        self.vectors = vectors
        self.k = k


class SearchBatcher:
    """Batches searches of one index from asyncio callers (:meth:`search`); :meth:`close` drains the queue."""

    def __init__(self, index: Any, max_queries: int = DEFAULT_SEARCH_MAX_QUERIES) -> None:
        self.index = index
        self.max_queries = max(1, int(max_queries))
        self._queue = WorkQueue("search-batcher", self._run, lambda: self.max_queries, max_delay_s=0.0,
                                closed_message="the search batcher is closed (the server is shutting down)")

    async def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``index.search(vectors, k)``, run in a batch with whatever other searches are queued."""
        loop = asyncio.get_running_loop()
        afut = loop.create_future()
        self._queue.put(_Search(vectors, k, loop, afut))
        return await afut

    def _run(self, taken: list[_Search]) -> None:
        """One search for the batch (one per request if it fails, so a bad query fails alone); answer each."""
        try:
            q = taken[0].vectors if len(taken) == 1 else np.concatenate([t.vectors for t in taken])
            scores, ids = self.index.search(q, max(t.k for t in taken))
        except Exception:  # noqa: BLE001 - one bad request must not fail its batch-mates: run them one by one
            answer([self._run_one(t) for t in taken])
            return
        out: list[Answer] = []
        lo = 0
        for t in taken:
            hi = lo + t.rows
            out.append((t, (scores[lo:hi, :t.k], ids[lo:hi, :t.k]), None))
            lo = hi
        answer(out)

    def _run_one(self, t: _Search) -> Answer:
        try:
            return t, self.index.search(t.vectors, t.k), None
        except Exception as exc:  # noqa: BLE001
            return t, None, exc

    def close(self, timeout: float | None = 30.0) -> None:
        """Answer what is queued, then stop the worker."""
        self._queue.close(drain=True)
        self._queue.join(timeout)


def public_metadata(meta: dict[str, Any] | None) -> dict[str, Any] | None:
    """A hit's metadata as a client sees it: an absolute ``path`` or ``image`` (where ``fine-infer index`` used to
    record the server's own file) becomes its file name; relative paths (relative to the indexed folder or
    catalogue, as it records them now) stay. The index keeps what it stores, so the CLI's search still opens them."""
    if not meta:
        return meta
    out = meta
    for key in ("path", "image"):
        v = meta.get(key)
        if isinstance(v, str) and (v.startswith(("/", "\\")) or (len(v) > 2 and v[1] == ":" and v[2] in "/\\")):
            if out is meta:
                out = dict(meta)
            out[key] = posixpath.basename(v.replace("\\", "/"))
    return out
