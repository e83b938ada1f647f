"""`fine-infer serve --workers 2`: two processes on one port, each ready before it accepts, answering exactly as the
bundle does in process, both doing work, and a drained SIGTERM ending them all with exit 0."""

import signal
import subprocess
import sys
import threading

import httpx
import numpy as np

from serve_helpers import DEADLINE_S, b64, free_port, png, wait_ready

CLI = [sys.executable, "-m", "fine_infer.cli"]


def _concurrently(n, call):
    barrier = threading.Barrier(n)
    out = [None] * n

    def run(i):
        barrier.wait(DEADLINE_S)
        out[i] = call(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE_S)
    return out


def test_two_workers_answer_like_the_bundle_and_drain_on_sigterm(maaf_bundle, maaf_session):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([*CLI, "serve", str(maaf_bundle), "--port", str(port), "--workers", "2",
                             "--max-batch-size", "4", "--log-level", "warning"], stderr=subprocess.PIPE)
    try:
        wait_ready(url, proc)
        images = [png(900 + i) for i in range(16)]
        texts = [f"make it {c}" for c in ("red", "blue", "green", "black")] * 4

        def ask(i):
            with httpx.Client(timeout=DEADLINE_S) as c:  # a new connection each: the kernel spreads them
                worker = c.get(url + "/v1/info").json()["worker"]
                r = c.post(url + "/v1/embed", json={"images": [b64(images[i])], "texts": [texts[i]]})
                assert r.status_code == 200, r.text
                return worker, np.asarray(r.json()["embeddings"][0], np.float32)

        seen = set()
        for _ in range(5):  # which process accepts is the kernel's choice: a few concurrent rounds see both
            answers = _concurrently(16, ask)
            seen |= {tuple(w) for w, _ in answers}
            want = maaf_session.compose(images, texts)
            got = np.stack([v for _, v in answers])
            assert np.abs(got - want).max() < 1e-5  # (the JSON answer carries 6 decimals)
            if len(seen) == 2:
                break
        assert seen == {(0, 2), (1, 2)}, seen
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(DEADLINE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, proc.stderr.read().decode()[-2000:]
