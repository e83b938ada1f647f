"""Connections and time are bounded (issue "Trust nothing from outside", findings 5 and 6), against a real server on
loopback with small limits: silent, slow-header, slow-body and oversized-header connections are closed (408 / 431),
connections past the cap are answered 503 and closed, requests past the queue cap 429, both with Retry-After; a
request's images are refused by their summed pixels before any decoding, and a request running past its time is
answered 504."""

import dataclasses
import io
import json
import socket
import threading
import time

import httpx
import pytest
from PIL import Image

import fine_infer
from fine_infer.batching import BatchSettings
from fine_infer.serve import Limits, ServerThread, create_app
from serve_helpers import DEADLINE_S, b64, huge_png_header, png

LIMITS = Limits(idle_timeout_s=1.0, read_timeout_s=1.0, request_timeout_s=1.5, max_connections=12, max_queue=4,
                max_header_bytes=8192, max_image_pixels=80_000_000, max_request_pixels=1_000_000_000)
SLACK_S = 3.0  # on top of a limit, for a loaded machine


@pytest.fixture(scope="module")
def srv(maaf_bundle):
    app = create_app(fine_infer.load(maaf_bundle), batching=BatchSettings(max_batch_size=4, lanes=1), limits=LIMITS)
    with ServerThread(app) as s:
        s.wait_ready(timeout=DEADLINE_S)
        yield s


def _connect(srv):
    s = socket.create_connection((srv.host, srv.port), timeout=DEADLINE_S)
    s.settimeout(LIMITS.read_timeout_s + LIMITS.idle_timeout_s + SLACK_S)
    return s


def _read_until_closed(s, trickle=None):
    """Everything the server sends until it closes the connection, and how long that took. ``trickle``: bytes sent
    one every 0.25 s meanwhile (a slow client)."""
    t0 = time.monotonic()
    out = b""
    s.settimeout(0.25 if trickle else LIMITS.read_timeout_s + LIMITS.idle_timeout_s + SLACK_S)
    pending = list(trickle or b"")
    while True:
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            assert trickle and time.monotonic() - t0 < LIMITS.read_timeout_s + SLACK_S, "the connection stayed open"
            if pending:
                try:
                    s.sendall(bytes([pending.pop(0)]))
                except OSError:  # closed meanwhile
                    pass
            continue
        except ConnectionResetError:
            break
        if not chunk:
            break
        out += chunk
    return out, time.monotonic() - t0


def _status_and_json(raw):
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body)


def test_a_silent_connection_is_closed_after_the_idle_timeout(srv):
    with _connect(srv) as s:
        raw, took = _read_until_closed(s)
    assert raw == b"" and LIMITS.idle_timeout_s * 0.8 <= took < LIMITS.idle_timeout_s + SLACK_S, took


def test_headers_trickling_in_are_cut_off_at_the_read_timeout(srv):
    with _connect(srv) as s:
        s.sendall(b"POST /v1/embed HTTP/1.1\r\nHost: x\r\n")
        raw, took = _read_until_closed(s, trickle=b"X-Slow: " + b"a" * 200)  # a byte every 0.25 s, never done
    status, headers, body = _status_and_json(raw)
    assert status == 408 and headers["connection"] == "close" and body["error"]["limit"] == "read_timeout_s"
    assert took < LIMITS.read_timeout_s + SLACK_S


def test_a_body_that_does_not_arrive_is_answered_408(srv):
    with _connect(srv) as s:
        s.sendall(b"POST /v1/embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"images\": [")
        raw, took = _read_until_closed(s)
    status, headers, body = _status_and_json(raw)
    assert status == 408 and body["error"]["type"] == "request_timeout", body
    assert LIMITS.read_timeout_s * 0.8 <= took < LIMITS.read_timeout_s + SLACK_S, took


def test_oversized_headers_are_answered_431(srv):
    with _connect(srv) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 900)
                                                                  for i in range(20)))
        raw, _ = _read_until_closed(s)
    status, _, body = _status_and_json(raw)
    assert status == 431 and body["error"]["limit"] == "max_header_bytes"
    with _connect(srv) as s:  # headers under the budget are fine
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: " + b"p" * 4000 + b"\r\n\r\n")
        raw, _ = _read_until_closed(s)
    assert _status_and_json(raw)[0] == 200


def test_a_malformed_request_is_answered_in_the_error_shape(srv):
    with _connect(srv) as s:
        s.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        raw, _ = _read_until_closed(s)
    status, headers, body = _status_and_json(raw)
    assert status == 400 and headers["content-type"] == "application/json" and body["error"]["type"] == "bad_request"


def test_connections_past_the_cap_are_refused_503_and_closed(srv):
    socks = [_connect(srv) for _ in range(LIMITS.max_connections + 4)]
    try:
        time.sleep(0.3)  # a refusal is immediate; the accepted wait (less than the idle timeout) for a request
        refused = []
        for s in socks:
            s.setblocking(False)
            try:
                raw = s.recv(65536)
            except BlockingIOError:
                continue  # accepted and waiting for a request
            s.setblocking(True)
            status, headers, body = _status_and_json(raw)
            assert status == 503 and headers["retry-after"] == "1" and body["error"]["limit"] == "max_connections"
            assert s.recv(10) == b""  # and closed at once
            refused.append(s)
        assert len(refused) >= 4 and len(socks) - len(refused) <= LIMITS.max_connections
    finally:
        for s in socks:
            s.close()
    deadline = time.monotonic() + DEADLINE_S
    while True:  # the server closes its side as it notices: then new connections are served again
        try:
            if httpx.get(srv.url + "/healthz", timeout=DEADLINE_S).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.1)


def _heavy_files(n):
    """``n`` 6000×6000 grey PNGs: ~0.3 s each to decode and resize here, far past LIMITS.request_timeout_s in all."""
    img = Image.new("L", (6000, 6000), 90)
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=1)
    return [("images", (f"{i}.png", buf.getvalue(), "image/png")) for i in range(n)]


@pytest.fixture()
def busy_srv(maaf_bundle):
    """The server of ``srv`` with a longer request timeout: the queue must stay full long enough for a probe to see
    it on a loaded box (the timeout runs from the first byte, so with 1.5 s an upload slowed by other work left
    almost no time between the heavy requests' admission and their 504)."""
    limits = dataclasses.replace(LIMITS, request_timeout_s=4.0)
    app = create_app(fine_infer.load(maaf_bundle), batching=BatchSettings(max_batch_size=4, lanes=1), limits=limits)
    with ServerThread(app) as s:
        s.wait_ready(timeout=DEADLINE_S)
        yield s


def test_requests_past_the_queue_cap_are_answered_429(busy_srv):
    """max_queue requests with their bodies in (here: long to decode) fill the queue; the next one is answered 429
    with Retry-After, while a slow upload holds no place in it and other routes are still answered."""
    srv = busy_srv
    files = _heavy_files(24)
    heavy = []
    threads = [threading.Thread(target=lambda: heavy.append(
        httpx.post(srv.url + "/v1/embed", files=files, timeout=DEADLINE_S))) for _ in range(LIMITS.max_queue)]
    with _connect(srv) as slow:  # a body that never completes: not counted
        slow.sendall(b"POST /v1/embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{")
        for t in threads:
            t.start()
        seen = []
        while any(t.is_alive() for t in threads):  # until the heavy ones are answered (504 at the request timeout)
            # A probe refused right after admission (an empty list: 400) holds its place for microseconds; a probe
            # that decodes an image would wait behind the heavy requests' images for a core, holding a place while
            # the last heavy upload completes, which then got the 429 instead (seen on a loaded box)
            r = httpx.post(srv.url + "/v1/embed", json={"images": []}, timeout=DEADLINE_S)
            seen.append(r.status_code)
            if r.status_code == 429:
                assert r.headers["retry-after"] == "1" and r.json()["error"]["limit"] == "max_queue"
                assert r.json()["error"]["limit_value"] == LIMITS.max_queue
                assert httpx.get(srv.url + "/v1/info", timeout=DEADLINE_S).status_code == 200  # only work waits
                break
        for t in threads:
            t.join(DEADLINE_S)
    assert 429 in seen and set(seen) <= {400, 429}, seen
    assert [r.status_code for r in heavy] == [504] * LIMITS.max_queue
    r = httpx.post(srv.url + "/v1/embed", json={"images": [b64(png(1))]}, timeout=DEADLINE_S)
    assert r.status_code == 200  # the queue emptied


def test_a_requests_images_are_refused_by_their_summed_pixels_before_decoding(srv):
    bomb = b64(huge_png_header(10_000, 7_000))  # 70 M pixels each: under max_image_pixels, 15 over the budget
    t0 = time.monotonic()
    r = httpx.post(srv.url + "/v1/embed", json={"images": [bomb] * 15}, timeout=DEADLINE_S)
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert err["limit"] == "max_request_pixels" and err["limit_value"] == LIMITS.max_request_pixels
    assert time.monotonic() - t0 < 2.0  # nothing was decoded


def test_a_request_past_its_time_is_answered_504_and_the_server_goes_on(srv):
    files = _heavy_files(24)  # ~7 s of decoding
    small = []
    t0 = time.monotonic()
    side = threading.Thread(target=lambda: small.append(
        httpx.post(srv.url + "/v1/embed", json={"images": [b64(png(3))]}, timeout=DEADLINE_S)))
    side.start()
    r = httpx.post(srv.url + "/v1/embed", files=files, timeout=DEADLINE_S)
    took = time.monotonic() - t0
    side.join(DEADLINE_S)
    assert r.status_code == 504, r.text
    assert r.json()["error"]["limit"] == "request_timeout_s"
    assert took < LIMITS.request_timeout_s + SLACK_S, took  # stopped at the next image, not after all 24
    assert small and small[0].status_code == 200


def test_a_connection_answered_before_its_body_still_times_out_idle(srv):
    # 415 is sent as soon as the headers are in; the body that follows used to cancel every timer on the connection,
    # so a few such clients could hold max_connections for ever
    with _connect(srv) as s:
        s.sendall(b"POST /v1/embed HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 19\r\n\r\n")
        first = s.recv(65536)
        assert first.startswith(b"HTTP/1.1 415"), first
        s.sendall(b'{"texts":["hello"]}')
        _, took = _read_until_closed(s)
    assert took < LIMITS.idle_timeout_s + SLACK_S, took


def test_broken_framing_after_the_headers_is_answered_400(srv):
    with _connect(srv) as s:
        s.sendall(b"POST /v1/embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\nzz\r\n")  # "zz" is no chunk size
        raw, _ = _read_until_closed(s)
    status, headers, body = _status_and_json(raw)
    assert status == 400 and headers["connection"] == "close" and body["error"]["type"] == "bad_request", raw


def test_oversized_headers_in_one_read_are_answered_431(srv):
    with _connect(srv) as s:  # the whole head at once: no read leaves it incomplete
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * (LIMITS.max_header_bytes + 2000) + b"\r\n\r\n")
        raw, _ = _read_until_closed(s)
    status, _, body = _status_and_json(raw)
    assert status == 431 and body["error"]["limit"] == "max_header_bytes", raw
    with _connect(srv) as s:  # a URL counts too
        s.sendall(b"GET /healthz?" + b"q" * (LIMITS.max_header_bytes + 2000) + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        raw, _ = _read_until_closed(s)
    assert _status_and_json(raw)[0] == 431


def test_no_redirect_is_built_from_the_host_header(srv):
    r = httpx.get(srv.url + "/healthz/", headers={"Host": "evil.example"}, follow_redirects=False,
                  timeout=DEADLINE_S)
    assert r.status_code == 404 and "location" not in r.headers, (r.status_code, r.headers)


def test_bodies_held_at_once_are_bounded_over_all_requests(maaf_bundle):
    limits = dataclasses.replace(LIMITS, max_body_bytes=200_000, max_body_bytes_held=300_000, read_timeout_s=5.0)
    app = create_app(fine_infer.load(maaf_bundle), batching=BatchSettings(max_batch_size=1), limits=limits)
    head = (b"POST /v1/embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 200000\r\n\r\n")
    with ServerThread(app) as srv:
        srv.wait_ready(timeout=DEADLINE_S)
        a, b = _connect(srv), _connect(srv)
        try:
            a.sendall(head + b" " * 160_000)  # each under max_body_bytes, together over max_body_bytes_held
            time.sleep(0.5)
            b.sendall(head + b" " * 160_000)
            b.settimeout(limits.read_timeout_s)
            status, headers, body = _status_and_json(b.recv(65536))
            assert status == 503 and body["error"]["limit"] == "max_body_bytes_held", body
            assert headers["retry-after"] and headers["connection"] == "close"
        finally:
            a.close()
            b.close()
        time.sleep(0.5)  # a's bytes are given back when its request ends
        r = httpx.post(srv.url + "/v1/embed", json={"images": [b64(png())]}, timeout=DEADLINE_S)
        assert r.status_code == 200, r.text
