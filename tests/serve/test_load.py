"""A short run of benchmarks/load_test.py (issue "Trust nothing from outside"): a real `fine-infer serve` with an
index keeps answering 16 busy clients while 200 idle connections are held open; no 5xx, no transport error, and a
drained SIGTERM at the end (exit 0, no traceback in its log)."""

import importlib.util
from pathlib import Path

import pytest

from fine_infer.index import Index
from serve_helpers import png

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "load_test.py"


@pytest.fixture(scope="module")
def load_test():
    spec = importlib.util.spec_from_file_location("load_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_busy_clients_beside_idle_connections(load_test, maaf_bundle, maaf_session, tmp_path):
    imgs = [png(900 + i) for i in range(16)]
    index = Index(maaf_session.manifest.embed_dim)
    index.add(maaf_session.embed_images(imgs), list(range(16)), metadata=[{"path": f"g/{i}.png"} for i in range(16)])
    index.attrs.update(bundle=str(maaf_bundle.resolve()), bundle_identity=maaf_session.manifest.identity())
    index.save(tmp_path / "g.fidx")
    with load_test.Server(maaf_bundle, tmp_path / "g.fidx", ["--max-batch-size", "8", "--lanes", "1"]) as srv:
        srv.wait_ready(timeout=60)
        res = load_test.run_load(srv.url, clients=16, idle=200, seconds=3.0, images=imgs, timeout=30)
        assert srv.stop() == 0
        log = srv.stderr()
    assert res["server_errors_5xx"] == 0 and res["transport_errors"] == 0, res
    assert set(res["by_status"]) == {"200"} and res["requests"] >= 32, res
    assert res["idle"]["open_at_start"] == 200 and res["idle"]["refused_503"] == 0, res
    assert 0 < res["p50_ms"] <= res["p99_ms"], res
    assert res["idle"]["server_connections_open_at_end"] >= 200, res  # the idle ones were open on the server too
    assert "Traceback" not in log, log
