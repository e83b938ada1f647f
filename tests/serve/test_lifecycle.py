"""The server as a process: `serve` on a free loopback port, readiness, graceful shutdown on SIGTERM, and the
loopback rule from the command line."""

import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np

from fine_infer.cli import main
from serve_helpers import DEADLINE_S, b64, free_port, png, run_concurrently, wait_ready


def _queued(url):
    """Requests waiting in the server's batcher, from ``/metrics``."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=DEADLINE_S).text
    return sum(s.value for f in text_string_to_metric_families(text) if f.name == "fine_infer_queue_depth"
               for s in f.samples)


def test_sigterm_drains_in_flight_requests(maaf_bundle, maaf_session, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    index_args = []
    try:  # with the index built, the same process also serves --index
        from fine_infer.index import Index

        gallery = [png(500 + i) for i in range(8)]
        index = Index(maaf_session.manifest.embed_dim)
        index.add(maaf_session.embed_images(gallery), list(range(8)), metadata=[{"n": i} for i in range(8)])
        index.save(tmp_path / "gallery.idx")
        index_args = ["--index", str(tmp_path / "gallery.idx")]
    except ImportError:
        pass
    # A long batching delay keeps the requests in flight (queued) when SIGTERM arrives; two lanes from the flag.
    proc = subprocess.Popen(
        [sys.executable, "-m", "fine_infer.cli", "serve", str(maaf_bundle), "--port", str(port),
         "--max-batch-size", "8", "--lanes", "2", "--max-delay-ms", "5000", "--fixed-delay", "--log-level", "warning",
         *index_args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_ready(url, proc)
        info = httpx.get(url + "/v1/info", timeout=DEADLINE_S).json()
        assert {g["lanes"] for g in info["graphs"].values()} == {2}
        assert {g["max_batch_size"] for g in info["graphs"].values()} == {8}
        if index_args:
            r = httpx.post(url + "/v1/search", json={"image": b64(gallery[3]), "k": 2}, timeout=DEADLINE_S)
            assert r.status_code == 200 and r.json()["hits"][0]["metadata"] == {"n": 3}
        imgs = [png(i) for i in range(4)]

        def call(img):
            with httpx.Client(timeout=DEADLINE_S) as c:
                return c.post(url + "/v1/embed", json={"images": [b64(img)]})

        import threading

        results = []
        t = threading.Thread(target=lambda: results.extend(run_concurrently(call, imgs, workers=4)))
        t.start()
        deadline = time.monotonic() + DEADLINE_S
        while _queued(url) < 4:  # all four wait in the batcher's queue (the 5 s delay holds them there)
            assert time.monotonic() < deadline and t.is_alive(), "the requests never queued up"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        t.join(DEADLINE_S)
        assert not t.is_alive()
        assert [r.status_code for r in results] == [200] * 4  # in flight at SIGTERM, drained and answered
        for img, r in zip(imgs, results):
            np.testing.assert_allclose(r.json()["embeddings"], maaf_session.embed_images([img]), atol=1e-5)
        assert proc.wait(timeout=30) == 0  # a drained SIGTERM is a normal stop
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_cli_refuses_a_public_bind_without_a_key(maaf_bundle, capsys, monkeypatch):
    assert main(["serve", str(maaf_bundle), "--host", "0.0.0.0"]) == 2
    assert "without an API key" in capsys.readouterr().err
    monkeypatch.delenv("FI_TEST_KEY", raising=False)
    assert main(["serve", str(maaf_bundle), "--api-key-env", "FI_TEST_KEY"]) == 2
    assert "FI_TEST_KEY" in capsys.readouterr().err
