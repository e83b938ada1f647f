"""Searches of a large gallery are batched across requests (one Index.search call serves many): every answer equal
to ``Index.search`` called directly for that query and k, a bad query fails alone, cancelled ones are skipped."""

import asyncio
import threading
import time

import httpx
import numpy as np
import pytest

import fine_infer
from ranking_checks import same_ids_ties_aside
from serve_helpers import DEADLINE_S, TEST_BATCHING, export_zoo, run_concurrently

from fine_infer.index import Index

from fine_infer.serve.app import INDEX_THREAD_MIN  # noqa: E402
from fine_infer.serve.search import SearchBatcher  # noqa: E402

WORDS = "a red blue black dress shirt bag with stripes dots long short sleeve collar".split()


def _unit(rng, n, dim):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class _CountingIndex:
    """An Index stand-in that records each search's query count and can hold the first search back."""

    def __init__(self, inner, hold_s=0.0):
        self.inner, self.hold_s, self.calls = inner, hold_s, []
        self.lock = threading.Lock()

    def __len__(self):
        return len(self.inner)

    def search(self, q, k):
        with self.lock:
            first = not self.calls
            self.calls.append(np.array(q))
        if first and self.hold_s:
            time.sleep(self.hold_s)  # the other searches queue up meanwhile
        return self.inner.search(q, k)


@pytest.fixture(scope="module")
def gallery():
    rng = np.random.default_rng(0)
    index = Index(32)
    n = INDEX_THREAD_MIN + 500
    index.add(_unit(rng, n, 32), np.arange(n) * 3 + 7, metadata=[{"sku": f"S{i}"} for i in range(n)])
    return index


def test_batched_searches_equal_direct_ones(gallery):
    rng = np.random.default_rng(1)
    queries = [(_unit(rng, int(rng.integers(1, 3)), 32), int(k)) for k in rng.choice([1, 5, 10, 50], 40)]
    counting = _CountingIndex(gallery, hold_s=0.2)
    sb = SearchBatcher(counting, max_queries=64)

    async def main():
        return await asyncio.wait_for(asyncio.gather(*(sb.search(q, k) for q, k in queries)), DEADLINE_S)

    try:
        results = asyncio.run(main())
    finally:
        sb.close()
    for (q, k), (scores, ids) in zip(queries, results):
        want_s, want_i = gallery.search(q, k)
        assert ids.shape == (len(q), k)
        np.testing.assert_array_equal(ids, want_i)
        np.testing.assert_allclose(scores, want_s, atol=1e-5)
    sizes = [len(c) for c in counting.calls]
    assert len(sizes) < len(queries) and max(sizes) > 1, sizes  # they shared scans


def test_a_bad_query_fails_alone_and_a_cancelled_one_is_skipped(gallery):
    rng = np.random.default_rng(2)
    good = [_unit(rng, 1, 32) for _ in range(6)]
    counting = _CountingIndex(gallery, hold_s=0.2)
    sb = SearchBatcher(counting)

    async def main():
        first = asyncio.ensure_future(sb.search(good[0], 3))  # holds the index while the rest queue
        await asyncio.sleep(0.05)
        bad = asyncio.ensure_future(sb.search(np.ones((1, 5), np.float32), 3))  # wrong dim
        gone = asyncio.ensure_future(sb.search(good[1], 3))
        rest = [asyncio.ensure_future(sb.search(q, 4)) for q in good[2:]]
        await asyncio.sleep(0)
        gone.cancel()
        out = await asyncio.wait_for(asyncio.gather(first, *rest), DEADLINE_S)
        with pytest.raises(Exception, match="dim"):
            await asyncio.wait_for(bad, DEADLINE_S)
        return out

    try:
        out = asyncio.run(main())
    finally:
        sb.close()
    for q, k, (scores, ids) in zip([good[0], *good[2:]], [3, 4, 4, 4, 4], out):
        np.testing.assert_array_equal(ids, gallery.search(q, k)[1])
    searched = [row for c in counting.calls for row in c]
    assert not any(np.array_equal(row, good[1][0]) for row in searched)  # the cancelled query never ran
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(sb.search(good[0], 1))


@pytest.fixture(scope="module")
def text_server(tmp_path_factory, gallery):
    bundle = export_zoo("fashion-fine", tmp_path_factory.mktemp("sb") / "fashion-fine")
    session = fine_infer.load(bundle)
    assert session.manifest.embed_dim == gallery.dim, "the gallery must have the tiny fashion-fine's width"
    from fine_infer.serve import ServerThread, create_app

    app = create_app(fine_infer.load(bundle), gallery, batching=TEST_BATCHING)
    with ServerThread(app) as srv:
        srv.wait_ready(timeout=60)
        yield srv, session


def test_32_clients_searching_by_text_get_the_direct_answers(text_server, gallery):
    srv, session = text_server
    rng = np.random.default_rng(3)
    jobs = [(" ".join(rng.choice(WORDS, int(rng.integers(1, 9)))), int(rng.choice([1, 10, 25]))) for _ in range(96)]

    def call(job):
        with httpx.Client(base_url=srv.url, timeout=DEADLINE_S) as c:
            return c.post("/v1/search", json={"text": job[0], "k": job[1]})

    for (text, k), r in zip(jobs, run_concurrently(call, jobs, workers=32)):
        assert r.status_code == 200, r.text
        scores, ids = gallery.search(session.embed_texts([text]), k)
        hits = r.json()["hits"]
        got_ids = np.array([h["id"] for h in hits])
        got_scores = np.array([h["score"] for h in hits])
        # The server embeds the text in a padded batch with others, alone here: scores agree to 1e-5, and two
        # gallery items whose scores tie that closely may come in either order.
        np.testing.assert_allclose(got_scores, scores[0], atol=1e-5)
        same_ids_ties_aside(got_ids, scores[0], ids[0], got_scores)
        assert [h["metadata"] for h in hits] == [gallery.get_metadata(int(i)) for i in got_ids]
