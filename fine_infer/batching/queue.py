"""The worker-loop core every batcher runs on: callers queue requests, worker thread(s) take a batch of them and hand
it to a callable, and each caller is answered its own way.

A request is answered one of three ways: a released lock (a blocking caller: the cheapest hand-off there is between
threads), a concurrent ``Future``, or an asyncio future on the caller's event loop; asyncio callers are answered with
one call into their loop per batch (one wake-up of the loop, not one per request). A request whose caller has given up
(timed out, future cancelled) is dropped when its batch is formed, never run.

A worker waits for a first request, then, with a delay, for company: only while some is to be expected when the delay
is adaptive (several requests queued, or the previous batch merged several), so a lone caller never waits. It takes
requests in order up to the batch's row limit (always at least one) and hands them to ``handle``, which runs them and
answers them with :func:`answer`. :meth:`WorkQueue.close` lets the workers drain what is queued (or fails it), then
they stop.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Iterable


class Request:
    """One caller's request of ``rows`` rows; subclasses add what the batch needs (feeds, vectors)."""

    __slots__ = ("rows", "enqueued", "future", "loop", "afut", "lock", "result", "error", "abandoned")

    def __init__(self, rows: int, future: Future | None = None, loop: asyncio.AbstractEventLoop | None = None,
                 afut: asyncio.Future | None = None) -> None:
        self.rows = rows
        self.enqueued = time.perf_counter()
        self.future = future
        self.loop = loop
        self.afut = afut
        self.lock: threading.Lock | None = None
        if future is None and afut is None:
            self.lock = threading.Lock()
            self.lock.acquire()  # released once the answer is in
        self.result: Any = None
        self.error: BaseException | None = None
        self.abandoned = False  # a blocking caller that timed out

    def start(self) -> bool:
        """Called as the request is taken into a batch: False when its caller has given up (skip it)."""
        if self.future is not None:
            return self.future.set_running_or_notify_cancel()
        if self.afut is not None:
            return not self.afut.cancelled()  # a disconnected HTTP client's request is not run
        return not self.abandoned

    def wanted(self) -> bool:
        """Whether the caller still waits for the answer (checked between the runs of a request split in several)."""
        if self.future is not None:
            return not self.future.cancelled()
        if self.afut is not None:
            return not self.afut.cancelled()
        return not self.abandoned

    def wait(self, timeout: float | None) -> Any:
        """The blocking caller's side: this request's answer, or its exception raised."""
        assert self.lock is not None
        if not self.lock.acquire(True, -1 if timeout is None else timeout):
            self.abandoned = True
            raise TimeoutError(f"no answer from the batcher within {timeout} s")
        if self.error is not None:
            raise self.error
        return self.result


Answer = tuple[Request, Any, "BaseException | None"]  # (request, its result, or the exception it gets)


def answer(answers: Iterable[Answer]) -> None:
    """Hand every request its result or its exception. Requests from asyncio callers are resolved with one call
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
    for loop, items in loops.items():
        try:
            loop.call_soon_threadsafe(_resolve_async, items)
        except RuntimeError:  # a closed loop: nobody is waiting on it any more
            pass


def _resolve_async(items: list[Answer]) -> None:
    for r, out, err in items:
        f = r.afut
        if f is not None and not f.done():  # done: cancelled meanwhile (the client went away)
            if err is None:
                f.set_result(out)
            else:
                f.set_exception(err)


class WorkQueue:
    """Queued requests and the worker thread(s) that take them in batches.

    ``handle(batch)`` runs a batch (a non-empty list of requests, in queue order) and answers every request in it.
    ``limit()``: the rows a batch may hold, or None while not known yet (every request then wakes a worker).
    ``prepare()``: called by a worker once a request is queued, before it forms a batch, outside the queue's lock;
    returns the row limit (it may take long: the batcher calibrates there). Default: ``limit()``, else 1.
    ``max_delay_s`` and ``adaptive_delay``: how long the oldest request may wait for company (module docstring).
    The first worker starts with the first request; :meth:`ensure_workers` adds more.
    """

    def __init__(self, name: str, handle: Callable[[list[Any]], None], limit: Callable[[], int | None], *,
                 prepare: Callable[[], int] | None = None, max_delay_s: float = 0.0,
                 adaptive_delay: bool = True, closed_message: str = "the queue is closed") -> None:
        self.name = name
        self._handle = handle
        self._limit = limit
        self._prepare = prepare
        self.max_delay_s = max_delay_s
        self.adaptive_delay = adaptive_delay
        self.closed_message = closed_message
        self.cond = threading.Condition()
        self.items: collections.deque[Request] = collections.deque()
        self.rows = 0  # rows waiting
        self.last_requests = 0  # requests merged into the previous batch
        self.threads: list[threading.Thread] = []
        self.closed = False

    def __len__(self) -> int:
        return len(self.items)

    def put(self, req: Request) -> None:
        """Queue ``req`` (RuntimeError once closed), starting the first worker if none runs yet."""
        limit = self._limit()
        with self.cond:
            if self.closed:
                raise RuntimeError(self.closed_message)
            if not self.threads:
                self._start_worker()
            was_empty = not self.items
            self.items.append(req)
            self.rows += req.rows
            # Wake a worker only when it has something new to do: a first request to wait on, or a full batch.
            # Waking it on every request costs a thread switch each, which is most of a tiny model's cost.
            if was_empty or limit is None or self.rows >= limit:
                self.cond.notify()

    def ensure_workers(self, n: int) -> None:
        """At least ``n`` workers taking batches at once (none are added once closed)."""
        with self.cond:
            while len(self.threads) < n and not self.closed:
                self._start_worker()

    def _start_worker(self) -> None:
        t = threading.Thread(target=self._work, name=f"{self.name}-{len(self.threads)}", daemon=True)
        self.threads.append(t)
        t.start()

    def _work(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return  # closed and drained
            if batch:
                self._handle(batch)

    def _take(self) -> list[Request] | None:
        """The next batch (empty when every request taken had been given up); None once closed and empty."""
        with self.cond:
            while not self.items and not self.closed:
                self.cond.wait()
            if not self.items:
                return None
        if self._prepare is not None:
            limit = self._prepare()
        else:
            limit = self._limit() or 1
        taken: list[Request] = []
        with self.cond:
            if self.items:
                deadline = self.items[0].enqueued + self.max_delay_s
                expect_company = not self.adaptive_delay or len(self.items) > 1 or self.last_requests > 1
                while expect_company and self.rows < limit and not self.closed:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    self.cond.wait(left)
            rows = 0
            while self.items and (not taken or rows + self.items[0].rows <= limit):
                r = self.items.popleft()
                self.rows -= r.rows
                if r.start():
                    taken.append(r)
                    rows += r.rows
            if taken:
                self.last_requests = len(taken)
        return taken

    def close(self, drain: bool = True) -> None:
        """Stop taking new requests. ``drain``: the workers answer every queued request before they stop; else the
        queued requests fail (RuntimeError) now."""
        failed: list[Answer] = []
        with self.cond:
            self.closed = True
            if not drain:
                while self.items:
                    r = self.items.popleft()
                    if r.start():
                        failed.append((r, None, RuntimeError("the batcher was closed before this request ran")))
                self.rows = 0
            self.cond.notify_all()
        answer(failed)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the workers to stop (after :meth:`close`)."""
        for t in list(self.threads):
            t.join(timeout)
