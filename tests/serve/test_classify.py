"""/v1/classify against a real server on the tiny `attributes` bundle: per head, label and probabilities equal to
Session.classify, under concurrent clients."""

import httpx
import pytest

import fine_infer
from serve_helpers import DEADLINE_S, TEST_BATCHING, b64, export_zoo, png, run_concurrently


@pytest.fixture(scope="module")
def attributes(tmp_path_factory):
    bundle = export_zoo("attributes", tmp_path_factory.mktemp("attr") / "attributes")
    from fine_infer.serve import ServerThread, create_app

    app = create_app(fine_infer.load(bundle), batching=TEST_BATCHING)
    with ServerThread(app) as srv:
        srv.wait_ready(timeout=60)
        yield srv, fine_infer.load(bundle)


def test_classify_matches_the_session(attributes):
    srv, session = attributes
    jobs = [[png(10 * i + j) for j in range(1 + i % 3)] for i in range(24)]

    def call(imgs):
        with httpx.Client(base_url=srv.url, timeout=DEADLINE_S) as c:
            return c.post("/v1/classify", json={"images": [b64(x) for x in imgs]})

    for imgs, r in zip(jobs, run_concurrently(call, jobs, workers=12)):
        assert r.status_code == 200, r.text
        want = session.classify(imgs)
        got = r.json()["predictions"]
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert set(g) == set(w)
            for head in w:
                assert g[head]["label"] == w[head]["label"]
                assert g[head]["score"] == pytest.approx(w[head]["score"], abs=1e-5)
                assert g[head]["scores"] == pytest.approx(w[head]["scores"], abs=1e-5)


def test_classify_multipart_and_unsupported_routes(attributes):
    srv, session = attributes
    with httpx.Client(base_url=srv.url, timeout=DEADLINE_S) as c:
        r = c.post("/v1/classify", files=[("images", ("a.png", png(3), "image/png"))])
        assert r.status_code == 200 and r.json()["predictions"][0].keys() == session.classify([png(3)])[0].keys()
        r = c.post("/v1/embed", json={"images": [b64(png(1))]})
        assert r.status_code == 400 and r.json()["error"]["type"] == "unsupported"
