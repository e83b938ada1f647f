"""What a client sends is not trusted (issue "Trust nothing from outside"), against a real server on loopback: the
Content-Type is checked, every error has the documented shape and carries no object address, hits carry no absolute
server paths, blank texts are refused however they are blank, the configured limits are the only ones, and a client
that goes away mid-body is a disconnect, not a 500."""

import io
import logging
import re
import socket
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

import fine_infer
from fine_infer.batching import BatchSettings
from fine_infer.index import Index
from fine_infer.serve import Limits, ServerThread, create_app
from serve_helpers import DEADLINE_S, b64, png

IMG = b64(png(7))
ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}")


@pytest.fixture(scope="module")
def srv(maaf_bundle, maaf_session, tmp_path_factory):
    """A server with an index whose metadata holds absolute paths (as `fine-infer index` wrote them before) and a
    raised pixel limit."""
    folder = tmp_path_factory.mktemp("catalogue")
    imgs = [png(300 + i) for i in range(4)]
    index = Index(maaf_session.manifest.embed_dim)
    paths = [folder / "shoes" / "a.png", folder / "shoes" / "b.png", folder / "c.png", folder / "d.png"]
    index.add(maaf_session.embed_images(imgs), [0, 1, 2, 3],
              metadata=[{"path": str(p), "sku": f"S{i}"} for i, p in enumerate(paths)])
    app = create_app(fine_infer.load(maaf_bundle), index, batching=BatchSettings(max_batch_size=4, lanes=1),
                     limits=Limits(max_image_pixels=50_000_000))
    with ServerThread(app) as s:
        s.wait_ready(timeout=DEADLINE_S)
        s.imgs = imgs
        yield s


@pytest.fixture(scope="module")
def client(srv):
    with httpx.Client(base_url=srv.url, timeout=DEADLINE_S) as c:
        yield c


def _error(r, status):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body  # the documented shape, never FastAPI's {"detail": ...}
    assert body["error"]["type"] and body["error"]["message"]
    assert not ADDRESS.search(body["error"]["message"]), body
    return body["error"]


# --- finding 11: JSON routes take application/json only ------------------------------------------------------------
@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", None])
def test_json_routes_refuse_other_content_types(client, ctype):
    body = b'{"images": ["%s"]}' % IMG.encode()
    headers = {"content-type": ctype} if ctype else {}
    for route in ("/v1/embed", "/v1/classify"):
        assert _error(client.post(route, content=body, headers=headers), 415)["type"] == "unsupported_media_type"
    search = b'{"image": "%s", "k": 2}' % IMG.encode()
    assert _error(client.post("/v1/search", content=search, headers=headers), 415)["type"] == \
        "unsupported_media_type"
    r = client.post("/v1/embed", content=body, headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200, r.text


# --- finding 13: one error shape, no object addresses, no server paths ----------------------------------------------
def test_malformed_multipart_and_unknown_routes_answer_the_error_shape(client):
    r = client.post("/v1/embed", content=b"--xx\r\nContent-Disposition: form-data\r\n\r\nno end",
                    headers={"content-type": "multipart/form-data; boundary=xx"})
    assert _error(r, 400)["type"] in ("invalid_multipart", "invalid_input")
    r = client.post("/v1/embed", content=b"garbage", headers={"content-type": "multipart/form-data"})  # no boundary
    _error(r, 400)
    assert _error(client.get("/v1/nothing-here"), 404)["type"] == "not_found"
    assert _error(client.get("/v1/embed"), 405)["type"] == "method_not_allowed"


def test_errors_carry_no_object_addresses(client):
    for data in (b"\x00garbage, not an image", b"GIF89a\x00\x00", b"\x89PNG\r\n\x1a\n\x00\x00"):
        _error(client.post("/v1/embed", json={"images": [b64(data)]}), 400)
        r = client.post("/v1/embed", files=[("images", ("x.png", data, "image/png"))])
        _error(r, 400)


def test_hits_carry_no_absolute_server_paths(client, srv):
    r = client.post("/v1/search", json={"image": b64(srv.imgs[0]), "k": 4})
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert len(hits) == 4
    for h in hits:
        path = h["metadata"]["path"]
        assert not path.startswith("/") and str(srv.url) not in path and "catalogue" not in path, path
        assert path.endswith(".png") and h["metadata"]["sku"] == f"S{h['id']}"


# --- finding 14: blank is blank, whatever the characters -----------------------------------------------------------
BLANK = ["   ", "\x00", "\x00\x00\x00", "\u200b", "\u200b\u200c\u200d\u2060\ufeff", " \x00\u200b\t\n", "\u00ad"]


@pytest.mark.parametrize("truncate", [False, True])
def test_blank_texts_are_refused_alike(client, truncate):
    messages = set()
    for t in BLANK:
        err = _error(client.post("/v1/embed", json={"images": [IMG], "texts": [t], "truncate": truncate}), 400)
        assert err["type"] == "invalid_input" and err["field"] == "texts[0]", (repr(t), err)
        messages.add(err["message"])
    assert len(messages) == 1, messages  # one problem, one message
    r = client.post("/v1/embed", json={"images": [IMG], "texts": ["red \u200b dress"], "truncate": truncate})
    assert r.status_code == 200, r.text


# --- finding 12: the configured limits are the only limits ---------------------------------------------------------
def test_image_pixel_limit_is_the_configured_one(client):
    img = Image.new("L", (6400, 6300), 128)  # 40.3 M pixels: over the old hidden 40 M, under the 50 M configured
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=1)
    r = client.post("/v1/embed", files=[("images", ("big.png", buf.getvalue(), "image/png"))])
    assert r.status_code == 200, r.text


def test_text_char_limit_holds_on_the_truncate_path(client):
    text = "red dress " * 300  # 3000 characters: over the 2048 default, under the old 4096 of the truncate path
    for truncate in (False, True):
        err = _error(client.post("/v1/embed", json={"images": [IMG], "texts": [text], "truncate": truncate}), 400)
        assert err["limit"] == "max_text_chars" and err["limit_value"] == 2048, err


def test_a_text_char_limit_above_the_tokenizers_default_is_honoured(maaf_session):
    # the session's tokenize() takes the server's bound, so --max-text-chars is not capped by a hidden 4096
    app = create_app(maaf_session, batching=BatchSettings(max_batch_size=1), limits=Limits(max_text_chars=6000))
    with ServerThread(app) as s, httpx.Client(base_url=s.url, timeout=DEADLINE_S) as c:
        s.wait_ready(timeout=DEADLINE_S)
        long_text = "red dress " * 500  # 5000 characters
        r = c.post("/v1/embed", json={"images": [IMG], "texts": [long_text], "truncate": True})
        assert r.status_code == 200, r.text
        err = _error(c.post("/v1/embed", json={"images": [IMG], "texts": [long_text + "x" * 1001],
                                               "truncate": True}), 400)
        assert err["limit"] == "max_text_chars" and err["limit_value"] == 6000, err


# --- finding 7: a client gone mid-body is a disconnect ---------------------------------------------------------------
def _request_counts(url):
    text = httpx.get(url + "/metrics", timeout=DEADLINE_S).text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    return {(s.labels["route"], s.labels["status"]): s.value for s in fams["fine_infer_http_requests"].samples
            if s.name.endswith("_total")}


def test_client_gone_mid_body_is_a_disconnect_not_a_500(srv, caplog):
    before = _request_counts(srv.url)
    n = 5
    with caplog.at_level(logging.DEBUG):
        for _ in range(n):
            with socket.create_connection((srv.host, srv.port), timeout=DEADLINE_S) as s:
                s.sendall(b"POST /v1/embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100000\r\n\r\n{\"images\": [")
                time.sleep(0.05)
        deadline = time.monotonic() + DEADLINE_S
        while True:  # the server notices each disconnect on its own schedule: wait until all are counted
            after = _request_counts(srv.url)
            gone = after.get(("/v1/embed", "disconnected"), 0) - before.get(("/v1/embed", "disconnected"), 0)
            if gone >= n or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert gone == n, after
    assert after.get(("/v1/embed", "500"), 0) == before.get(("/v1/embed", "500"), 0), after
    mine = [r for r in caplog.records if r.name.startswith(("fine_infer", "uvicorn"))]
    assert not [r for r in mine if r.exc_info or r.levelno >= logging.ERROR], [r.getMessage() for r in mine]
    assert len(mine) <= n, [r.getMessage() for r in mine]  # one line each at most
    assert all("\n" not in r.getMessage() for r in mine)
    r = httpx.post(srv.url + "/v1/embed", json={"images": [IMG]}, timeout=DEADLINE_S)
    assert r.status_code == 200 and np.asarray(r.json()["embeddings"]).shape[0] == 1
