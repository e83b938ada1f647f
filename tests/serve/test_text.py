"""Text over HTTP with the tiny Fashion-FINE bundle (a text-only graph, padding to max_length): embeddings equal to
Session.embed_texts under concurrent clients, token limits, truncation, and text search when the index exists."""

import asyncio

import httpx
import numpy as np
import pytest

import fine_infer
from fine_infer.serve import Limits, create_app
from serve_helpers import DEADLINE_S, TEST_BATCHING, UNBATCHED, export_zoo, run_concurrently

WORDS = "a red blue black dress shirt bag with stripes dots long short sleeve collar".split()


@pytest.fixture(scope="module")
def ff(tmp_path_factory):
    bundle = export_zoo("fashion-fine", tmp_path_factory.mktemp("ff") / "fashion-fine")
    from fine_infer.serve import ServerThread

    session = fine_infer.load(bundle)
    from fine_infer.index import Index

    index = Index(session.manifest.embed_dim)
    texts = [f"{c} {g}" for c in ("red", "blue", "black") for g in ("dress", "shirt", "bag")]
    index.add(session.embed_texts(texts), list(range(len(texts))), metadata=[{"caption": t} for t in texts])
    app = create_app(fine_infer.load(bundle), index, batching=TEST_BATCHING)
    with ServerThread(app) as srv:
        srv.wait_ready(timeout=60)
        yield srv, session, index


def test_concurrent_text_embeddings_equal_direct_calls(ff):
    srv, session, _ = ff
    rng = np.random.default_rng(0)
    jobs = [[" ".join(rng.choice(WORDS, int(rng.integers(1, 12)))) for _ in range(int(rng.integers(1, 4)))]
            for _ in range(48)]

    def call(texts):
        with httpx.Client(base_url=srv.url, timeout=DEADLINE_S) as c:
            return c.post("/v1/embed", json={"texts": texts})

    for texts, r in zip(jobs, run_concurrently(call, jobs, workers=16)):
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["embeddings"], session.embed_texts(texts), atol=1e-5)


def test_token_limits_and_truncation(ff):
    srv, session, _ = ff
    long_text = "red dress with long sleeves " * 12  # well past the tiny model's 32 tokens
    with httpx.Client(base_url=srv.url, timeout=DEADLINE_S) as c:
        r = c.post("/v1/embed", json={"texts": [long_text]})
        assert r.status_code == 400 and r.json()["error"]["limit"] == "max_text_tokens"
        r = c.post("/v1/embed", json={"texts": [long_text], "truncate": True})
        assert r.status_code == 200
        np.testing.assert_allclose(r.json()["embeddings"], session.embed_texts([long_text], truncate=True), atol=1e-5)
        r = c.post("/v1/embed", json={"texts": ["!!!"]})  # no tokens once cleaned? then a named 400, never a 500
        assert r.status_code in (200, 400)
    app = create_app(session, limits=Limits(max_text_tokens=6), prepare="skip", batching=UNBATCHED)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.post("/v1/embed", json={"texts": ["a red dress with long sleeves and a collar"]})

    r = asyncio.run(go())
    assert r.status_code == 400 and r.json()["error"]["limit"] == "max_text_tokens"
    assert r.json()["error"]["limit_value"] == 6 and '"truncate": true' in r.json()["error"]["message"]

    # truncate cuts to the server's limit, not the model's: the first 4 words and the end token (6 tokens here)
    short = "a red dress with"
    assert session.tokenize([short])[1].sum() == 6  # one token a word, plus the two special ones

    async def cut():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.post("/v1/embed", json={"texts": ["a red dress with long sleeves and a collar"],
                                                   "truncate": True})

    r = asyncio.run(cut())
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["embeddings"], session.embed_texts([short]), atol=1e-5)


def test_text_search(ff):
    srv, session, index = ff
    with httpx.Client(base_url=srv.url, timeout=DEADLINE_S) as c:
        r = c.post("/v1/search", json={"text": "blue shirt", "k": 3})
    assert r.status_code == 200, r.text
    scores, ids = index.search(session.embed_texts(["blue shirt"]), 3)
    assert [h["id"] for h in r.json()["hits"]] == [int(i) for i in ids[0]]
    np.testing.assert_allclose([h["score"] for h in r.json()["hits"]], scores[0], atol=1e-5)
    assert r.json()["hits"][0]["metadata"] == index.get_metadata(int(ids[0][0]))
    with httpx.Client(base_url=srv.url, timeout=DEADLINE_S) as c:
        r = c.post("/v1/search", json={"text": "  ", "k": 3})  # the error names the request's own field
        assert r.status_code == 400 and r.json()["error"]["field"] == "text", r.text
        r = c.post("/v1/embed", json={"texts": ["a dress", "  "]})
        assert r.status_code == 400 and r.json()["error"]["field"] == "texts[1]", r.text
