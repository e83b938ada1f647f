"""The native search releases the GIL, and concurrent searches and mutations from Python threads stay correct."""

import threading
import time

import numpy as np
from conftest import unit

from fine_infer.index import Index


def test_search_releases_the_gil():
    """While one thread is inside a long native search, another Python thread keeps running. With the GIL held, that
    thread could only run during the few bytecodes before the call: its observations would span milliseconds, not
    most of the search."""
    index = Index(256, threads=1)
    index.add(unit(50_000, 256, 0), np.arange(50_000))
    q = unit(256, 256, 1)
    index.search(q[:8], 10)  # warm up (page faults, rebuild checks)
    in_search = threading.Event()
    stop = threading.Event()
    seen: list[float] = []

    def watcher():
        while not stop.is_set():
            if in_search.is_set():
                seen.append(time.perf_counter())
            time.sleep(0.001)

    t = threading.Thread(target=watcher)
    t.start()
    try:
        for _ in range(5):  # long enough to measure even on a slow or busy machine
            seen.clear()
            in_search.set()
            t0 = time.perf_counter()
            index.search(q, 10)
            t1 = time.perf_counter()
            in_search.clear()
            if t1 - t0 >= 0.1:
                break
            q = np.concatenate([q, q])
    finally:
        stop.set()
        t.join()
    assert t1 - t0 >= 0.1, "the search was too quick to tell"
    assert seen, "the other thread never ran during the search"
    span = max(seen) - min(seen)
    assert span >= 0.5 * (t1 - t0), (span, t1 - t0)


def test_concurrent_searches_equal_serial_ones():
    index = Index(64, "int8")
    index.add(unit(20_000, 64, 2), np.arange(20_000))
    queries = [unit(16, 64, 10 + j) for j in range(8)]
    serial = [index.search(q, 10) for q in queries]
    results = [None] * len(queries)

    def run(j):
        for _ in range(3):
            results[j] = index.search(queries[j], 10)

    threads = [threading.Thread(target=run, args=(j,)) for j in range(len(queries))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (s1, i1), (s2, i2) in zip(serial, results):
        assert (i1 == i2).all() and np.array_equal(s1, s2)


def test_searches_during_adds_and_removes():
    """Readers always find the anchors (never removed) while a writer adds and removes other vectors."""
    dim = 32
    anchors = unit(10, dim, 3)
    index = Index(dim, threads=2)
    index.add(anchors, np.arange(10))
    errors: list[str] = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            s, i = index.search(anchors, 1)
            if not (i[:, 0] == np.arange(10)).all() or not np.allclose(s[:, 0], 1, atol=1e-5):
                errors.append(f"anchors lost: {i[:, 0]}")

    def writer():
        rng = np.random.default_rng(0)
        for step in range(60):
            ids = np.arange(1000 + step * 100, 1000 + step * 100 + 100)
            index.add(unit(100, dim, 100 + step) * 0.5, ids)  # norm 0.5: never outranks an anchor on itself
            index.remove(rng.choice(ids, 50, replace=False))

    readers = [threading.Thread(target=reader) for _ in range(3)]
    for t in readers:
        t.start()
    writer()
    stop.set()
    for t in readers:
        t.join()
    assert not errors, errors[:3]
    assert len(index) == 10 + 60 * 50
