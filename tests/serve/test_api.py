"""The HTTP API against a real server: answers equal to direct Session calls, every bad input a named 4xx,
limits, auth, readiness, metrics, the OpenAPI schema."""

import numpy as np
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fine_infer.errors import ConfigError
from fine_infer.serve import Limits, check_bind, create_app
from serve_helpers import DEADLINE_S, UNBATCHED, b64, huge_png_header, png, run_concurrently

WORDS = "red blue black dress shirt bag with stripes dots long short sleeve collar".split()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=DEADLINE_S) as c:
        yield c


def test_health_ready_info_and_schema(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    for path in ("/healthz", "/readyz"):  # load balancers probe with HEAD too
        r = client.head(path)
        assert r.status_code == 200 and r.content == b"", (path, r.status_code)
    info = client.get("/v1/info").json()
    assert info["arch"] == "maaf" and info["tasks"] == ["compose", "embed_image"]
    assert all(g["max_batch_size"] >= 1 for g in info["graphs"].values())  # calibrated at start-up
    schema = client.get("/openapi.json").json()
    assert {"/v1/embed", "/v1/search", "/v1/classify", "/healthz", "/readyz", "/metrics"} <= set(schema["paths"])
    body = schema["paths"]["/v1/embed"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(body)
    assert "EmbedRequest" in schema["components"]["schemas"]


def test_concurrent_clients_get_answers_equal_to_direct_calls(server, maaf_session):
    rng = np.random.default_rng(0)
    jobs = []
    for i in range(48):  # bounded: 48 requests from 16 clients
        n = int(rng.integers(1, 3))
        imgs = [png(100 * i + j, (int(rng.integers(40, 120)), int(rng.integers(40, 120)))) for j in range(n)]
        texts = [" ".join(rng.choice(WORDS, int(rng.integers(1, 10)))) for _ in range(n)] if i % 2 else None
        jobs.append((imgs, texts))

    def call(job):
        imgs, texts = job
        body = {"images": [b64(x) for x in imgs], **({"texts": texts} if texts else {})}
        with httpx.Client(base_url=server.url, timeout=DEADLINE_S) as c:
            r = c.post("/v1/embed", json=body)
        assert r.status_code == 200, r.text
        return np.asarray(r.json()["embeddings"], np.float32), r.json()["graph"]

    results = run_concurrently(call, jobs, workers=16)
    for (imgs, texts), (got, graph) in zip(jobs, results):
        want = maaf_session.compose(imgs, texts) if texts else maaf_session.embed_images(imgs)
        assert graph == ("compose" if texts else "gallery")
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_multipart_upload(client, maaf_session):
    imgs = [png(1), png(2)]
    r = client.post("/v1/embed", files=[("images", ("a.png", imgs[0], "image/png")),
                                        ("images", ("b.png", imgs[1], "image/png"))],
                    data={"texts": ["red dress", "blue shirt"]})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["embeddings"], maaf_session.compose(imgs, ["red dress", "blue shirt"]),
                               atol=1e-5)
    r = client.post("/v1/embed", files=[("photos", ("a.png", imgs[0], "image/png"))])
    assert r.status_code == 422 and r.json()["error"]["field"] == "photos"


IMG = b64(png(7))

BAD = [
    # (route, json body, status, error type, named limit or field)
    ("/v1/embed", {"images": [b64(b"\x00garbage, not an image")]}, 400, "invalid_input", None),
    ("/v1/embed", {"images": [b64(huge_png_header())]}, 413, "limit_exceeded", "max_image_pixels"),
    ("/v1/embed", {"images": ["###not base64###"]}, 400, "invalid_input", "images[0]"),
    ("/v1/embed", {"images": [IMG], "texts": [""]}, 400, "invalid_input", "texts[0]"),
    ("/v1/embed", {"images": [IMG], "texts": ["   "]}, 400, "invalid_input", "texts[0]"),
    ("/v1/embed", {"images": [IMG], "texts": ["red dress " * 30]}, 400, "limit_exceeded", "max_text_tokens"),
    ("/v1/embed", {"images": [IMG], "texts": ["x" * 5000]}, 400, "limit_exceeded", "max_text_chars"),
    ("/v1/embed", {"images": [IMG] * 33}, 400, "limit_exceeded", "max_batch_items"),
    ("/v1/embed", {"images": []}, 400, "invalid_input", "images"),
    ("/v1/embed", {"images": [IMG, IMG], "texts": ["red"]}, 400, "invalid_input", None),
    ("/v1/embed", {"texts": ["red dress"]}, 400, "unsupported", None),  # maaf has no text-only graph
    ("/v1/embed", {}, 400, "invalid_input", None),
    ("/v1/embed", {"images": IMG}, 422, "invalid_field", "images"),
    ("/v1/embed", {"images": [IMG], "texts": [5]}, 422, "invalid_field", "texts.0"),
    ("/v1/embed", {"images": [IMG], "truncate": "yes"}, 422, "invalid_field", "truncate"),
    ("/v1/embed", {"images": [IMG], "colour": "red"}, 422, "unknown_field", "colour"),
    ("/v1/embed", [IMG], 422, "invalid_body", None),
    ("/v1/search", {"image": IMG, "k": 0}, 400, "limit_exceeded", "max_k"),
    ("/v1/search", {"image": IMG, "k": 10**9}, 400, "limit_exceeded", "max_k"),
    ("/v1/search", {"image": IMG, "k": "5"}, 422, "invalid_field", "k"),
    ("/v1/search", {"image": IMG, "k": 5.5}, 422, "invalid_field", "k"),
    ("/v1/search", {"image": IMG, "top_k": 5}, 422, "unknown_field", "top_k"),
    ("/v1/classify", {"images": [IMG]}, 400, "unsupported", None),  # maaf is no classifier
    ("/v1/classify", {"images": [IMG], "texts": ["x"]}, 422, "unknown_field", "texts"),
]


@pytest.mark.parametrize("route,body,status,kind,named", BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_bad_input_gets_a_named_4xx(client, route, body, status, kind, named):
    r = client.post(route, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == kind and err["message"]
    if named is not None:
        assert named in (err.get("limit"), err.get("field")), err


def test_malformed_json_and_empty_body(client):
    r = client.post("/v1/embed", content=b'{"images": [', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_json"
    r = client.post("/v1/embed", content=b"", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_json"
    r = client.post("/v1/embed", content=b"")  # no Content-Type: not JSON
    assert r.status_code == 415 and r.json()["error"]["type"] == "unsupported_media_type"


def test_body_limit_by_length_and_while_streaming(maaf_session):
    app = create_app(maaf_session, limits=Limits(max_body_bytes=1000), prepare="skip", batching=UNBATCHED)
    transport = httpx.ASGITransport(app=app)

    async def go():
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            r1 = await c.post("/v1/embed", content=b"x" * 5000, headers={"content-type": "application/json"})

            async def chunks():  # no Content-Length: counted while it streams
                for _ in range(10):
                    yield b"x" * 500

            r2 = await c.post("/v1/embed", content=chunks(), headers={"content-type": "application/json"})
            return r1, r2

    import asyncio

    for r in asyncio.run(go()):
        assert r.status_code == 413 and r.json()["error"]["limit"] == "max_body_bytes"


def test_server_keeps_serving_and_metrics_parse(client):
    assert client.get("/healthz").status_code == 200
    r = client.post("/v1/embed", json={"images": [IMG]})
    assert r.status_code == 200
    text = client.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("fine_infer_http_requests", "fine_infer_http_request_duration_seconds", "fine_infer_batch_size",
                 "fine_infer_queue_depth", "fine_infer_http_requests_in_flight"):
        assert name in families, name
    counts = {(s.labels["route"], s.labels["status"]): s.value for s in families["fine_infer_http_requests"].samples
              if s.name.endswith("_total")}
    assert counts[("/v1/embed", "200")] >= 1
    assert counts.get(("/v1/embed", "422"), 0) >= 1 and counts.get(("/v1/embed", "400"), 0) >= 1
    batch = [s for s in families["fine_infer_batch_size"].samples if s.name.endswith("_count")]
    assert sum(s.value for s in batch) >= 1
    info = client.get("/v1/info").json()["graphs"]
    lanes = {s.labels["graph"]: s.value for s in families["fine_infer_lanes"].samples}
    assert lanes == {g: v["lanes"] for g, v in info.items()} and all(n >= 1 for n in lanes.values())


def test_api_key_and_loopback_rule(maaf_session):
    app = create_app(maaf_session, api_key="s3cret", prepare="skip", batching=UNBATCHED)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return [await c.post("/v1/embed", json={"images": [IMG]}),
                    await c.post("/v1/embed", json={"images": [IMG]}, headers={"Authorization": "Bearer nope"}),
                    await c.post("/v1/embed", json={"images": [IMG]}, headers={"Authorization": "Bearer s3cret"}),
                    await c.post("/v1/embed", json={"images": [IMG]}, headers={"X-API-Key": "s3cret"}),
                    await c.get("/metrics"), await c.get("/healthz")]

    import asyncio

    r = asyncio.run(go())
    assert [x.status_code for x in r] == [401, 401, 200, 200, 401, 200]
    assert r[0].json()["error"]["type"] == "unauthorized"
    with pytest.raises(ConfigError, match="API key"):
        check_bind("0.0.0.0", None)
    check_bind("0.0.0.0", "key")
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_bind(host, None)


def test_not_ready_until_prepared(maaf_session):
    app = create_app(maaf_session, batching=UNBATCHED)  # background preparation never starts: no lifespan here

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return (await c.get("/healthz"), await c.get("/readyz"),
                    await c.post("/v1/embed", json={"images": [IMG]}))

    import asyncio

    health, ready, embed = asyncio.run(go())
    assert health.status_code == 200 and ready.status_code == 503 and embed.status_code == 503
    assert embed.json()["error"]["type"] == "not_ready"
