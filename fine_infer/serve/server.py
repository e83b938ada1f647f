"""Running the app on uvicorn: the loopback rule, graceful shutdown, and a server in a thread for tests/bench."""

from __future__ import annotations

import gc
import ipaddress
import socket
import threading
import time
from typing import Any

from fine_infer.errors import ConfigError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse a non-loopback bind without an API key: an open model server should never be one flag away."""
    if not api_key and not is_loopback(host):
        raise ConfigError(
            f"refusing to listen on {host} without an API key; set one with --api-key-env VAR (the environment "
            "variable holding the key) or listen on 127.0.0.1"
        )


def _config(app: Any, host: str, port: int, log_level: str, access_log: bool, graceful_s: float):
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                          timeout_graceful_shutdown=graceful_s, lifespan="on", server_header=False)


def run(
    app: Any,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    api_key: str | None = None,
    log_level: str = "info",
    access_log: bool = False,
    graceful_s: float = 30.0,
) -> None:
    """Serve ``app`` until SIGINT/SIGTERM; then stop accepting, finish in-flight requests (up to ``graceful_s``),
    and drain the batcher."""
    import uvicorn

    check_bind(host, api_key)
    # Everything loaded so far (model, tokenizer, the index and its metadata) lives as long as the server: keep it
    # out of the garbage collector's scans, which otherwise walk it again in every full collection.
    gc.collect()
    gc.freeze()
    uvicorn.Server(_config(app, host, port, log_level, access_log, graceful_s)).run()


class ServerThread:
    """The app on uvicorn in a background thread, on an ephemeral loopback port (tests, ``bench_serve``)::

        with ServerThread(app) as srv:
            httpx.get(srv.url + "/healthz")
    """

    def __init__(self, app: Any, host: str = DEFAULT_HOST, port: int = 0, log_level: str = "warning",
                 graceful_s: float = 10.0) -> None:
        import uvicorn

        if not is_loopback(host):
            raise ConfigError("ServerThread listens on loopback only")
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        self.server = uvicorn.Server(_config(app, host, self.port, log_level, False, graceful_s))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name=f"uvicorn-{self.port}")

    def start(self, timeout: float = 30.0) -> "ServerThread":
        """Start and wait until uvicorn has started (not necessarily ready: poll ``/readyz``)."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.01)
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Poll ``/readyz`` until it answers 200 (bounded by ``timeout``)."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/readyz", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.url} did not become ready in {timeout} s")

    def stop(self, timeout: float = 30.0) -> None:
        """Graceful stop: as on SIGTERM."""
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
