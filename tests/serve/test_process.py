"""`fine-infer serve` and the CLI as processes (issue "Trust nothing from outside", findings 8, 9, 15): an index built
by another bundle is refused in one line unless allowed, a drained SIGTERM exits 0, the limit options reach
/v1/info, a busy port is one line before anything loads, and a reader that goes away is no traceback."""

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from fine_infer.errors import ConfigError
from fine_infer.index import Index
from fine_infer.serve import create_app
from serve_helpers import DEADLINE_S, UNBATCHED, b64, free_port, png, wait_ready

CLI = [sys.executable, "-m", "fine_infer.cli"]


def _gallery_index(session, path, **attrs):
    imgs = [png(700 + i) for i in range(4)]
    index = Index(session.manifest.embed_dim)
    index.add(session.embed_images(imgs), [0, 1, 2, 3])
    index.attrs.update(attrs)
    index.save(path)
    return path


def _one_line(stderr: bytes) -> str:
    text = stderr.decode().strip()
    assert text and "\n" not in text and "Traceback" not in text, text
    return text


# --- finding 8 ------------------------------------------------------------------------------------------------------
def test_an_index_from_another_bundle_is_refused_in_one_line(maaf_bundle, maaf_session, tmp_path):
    other = _gallery_index(maaf_session, tmp_path / "other.fidx", bundle="/elsewhere/bundle",
                           bundle_identity="0" * 64)
    r = subprocess.run([*CLI, "serve", str(maaf_bundle), "--index", str(other), "--port", str(free_port())],
                       capture_output=True, timeout=DEADLINE_S)
    assert r.returncode == 2
    line = _one_line(r.stderr)
    assert "another bundle" in line and "--allow-index-mismatch" in line, line


def test_what_the_index_records_decides(maaf_bundle, maaf_session, tmp_path):
    here = str(maaf_bundle.resolve())
    identity = maaf_session.manifest.identity()

    def app(**attrs):
        index = Index.load(_gallery_index(maaf_session, tmp_path / "g.fidx", **attrs))
        return create_app(maaf_session, index, prepare="skip", batching=UNBATCHED)

    app(bundle=here, bundle_identity=identity)
    app(bundle="/a/copy/of/it", bundle_identity=identity)  # the same bundle elsewhere: the identity says so
    app(bundle=here)  # an older index: the path is all there is, and it matches
    app()  # records nothing: nothing to compare
    with pytest.raises(ConfigError, match="another bundle"):
        app(bundle=here, bundle_identity="f" * 64)  # the same path, rebuilt since
    with pytest.raises(ConfigError, match="/elsewhere/bundle"):
        app(bundle="/elsewhere/bundle")
    index = Index.load(_gallery_index(maaf_session, tmp_path / "g.fidx", bundle_identity="f" * 64))
    create_app(maaf_session, index, prepare="skip", batching=UNBATCHED, allow_index_mismatch=True)


# --- findings 9 and 8 (the flag), and the limit options ---------------------------------------------------------------
def test_sigterm_exits_0_after_a_drain_and_the_limit_options_reach_info(maaf_bundle, maaf_session, tmp_path):
    other = _gallery_index(maaf_session, tmp_path / "other.fidx", bundle="/elsewhere/bundle",
                           bundle_identity="0" * 64)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [*CLI, "serve", str(maaf_bundle), "--port", str(port), "--index", str(other), "--allow-index-mismatch",
         "--max-batch-size", "4", "--lanes", "1", "--log-level", "warning",
         "--request-timeout", "20", "--read-timeout", "7.5", "--idle-timeout", "3", "--max-connections", "300",
         "--max-queue", "50", "--max-request-pixels", "30000000", "--max-text-chars", "1000",
         "--max-header-bytes", "20000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_ready(url, proc)
        limits = httpx.get(url + "/v1/info", timeout=DEADLINE_S).json()["limits"]
        assert {k: limits[k] for k in ("request_timeout_s", "read_timeout_s", "idle_timeout_s", "max_connections",
                                        "max_queue", "max_request_pixels", "max_text_chars", "max_header_bytes")} == \
            {"request_timeout_s": 20.0, "read_timeout_s": 7.5, "idle_timeout_s": 3.0, "max_connections": 300,
             "max_queue": 50, "max_request_pixels": 30_000_000, "max_text_chars": 1000, "max_header_bytes": 20000}
        assert limits["max_image_pixels"] == 25_000_000  # a default, reported too
        r = httpx.post(url + "/v1/search", json={"image": b64(png(700)), "k": 2}, timeout=DEADLINE_S)
        assert r.status_code == 200, r.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=DEADLINE_S) == 0
        err = proc.stderr.read().decode()
        assert "Traceback" not in err and "mismatch" in err, err  # served despite the mismatch, and said so
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# --- finding 15 -----------------------------------------------------------------------------------------------------
def test_a_busy_port_is_one_line_before_anything_loads(maaf_bundle):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        t0 = time.monotonic()
        r = subprocess.run([*CLI, "serve", str(maaf_bundle), "--port", str(port)], capture_output=True,
                           timeout=DEADLINE_S)
    assert r.returncode == 2
    line = _one_line(r.stderr)
    assert f"port {port}" in line and "in use" in line, line
    assert b"Uvicorn" not in r.stderr and b"fine-infer serve: " + str(maaf_bundle).encode() not in r.stderr
    assert time.monotonic() - t0 < 20  # the bundle was not loaded (nor the model warmed up) first


@pytest.mark.parametrize("argv,status", [(["info", "{bundle}"], {141}), (["--help"], {0, 141}),
                                         (["serve", "--help"], {0, 141})])
def test_a_reader_gone_is_no_traceback(maaf_bundle, argv, status):
    """`fine-infer info B | head -1`: stdout's reader is gone before the command writes (the worst case). (argparse
    itself ignores a failed write of --help.)"""
    r, w = os.pipe()
    os.close(r)
    try:
        res = subprocess.run([*CLI, *(a.format(bundle=maaf_bundle) for a in argv)], stdout=w,
                             stderr=subprocess.PIPE, timeout=DEADLINE_S)
    finally:
        os.close(w)
    assert res.stderr == b"", res.stderr.decode()
    assert res.returncode in status  # 141: as a process that SIGPIPE ended
