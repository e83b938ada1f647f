"""Fixtures of the serve tests: one tiny MAAF bundle and one real server on an ephemeral loopback port."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # serve_helpers, beside this file

for _mod in ("fastapi", "uvicorn", "prometheus_client", "python_multipart", "matplotlib"):
    pytest.importorskip(_mod, reason="the serve tests need the 'serve' extra")
pytest.importorskip("httpx", reason="the serve tests need the 'test' extra")

import fine_infer  # noqa: E402
from serve_helpers import TEST_BATCHING, export_maaf  # noqa: E402


@pytest.fixture(scope="session")
def maaf_bundle(tmp_path_factory):
    return export_maaf(tmp_path_factory.mktemp("serve") / "maaf")


@pytest.fixture(scope="session")
def maaf_session(maaf_bundle):
    return fine_infer.load(maaf_bundle)


@pytest.fixture(scope="module")
def server(maaf_bundle):
    """A real uvicorn server (its own session) in a thread; ready before the tests run."""
    from fine_infer.serve import ServerThread, create_app

    app = create_app(fine_infer.load(maaf_bundle), batching=TEST_BATCHING)
    with ServerThread(app) as srv:
        srv.wait_ready(timeout=60)
        yield srv
