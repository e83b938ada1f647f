"""Running the app on uvicorn: the loopback rule, the listening socket (a busy port is one line, before anything is
loaded), the connection limits (:mod:`fine_infer.serve.connections`), graceful shutdown (exit status 0 after a
drained SIGTERM), and a server in a thread for tests/bench."""

from __future__ import annotations

import errno
import gc
import ipaddress
import logging
import signal
import socket
import threading
import time
from typing import Any, Callable

from fine_infer.errors import ConfigError
from fine_infer.serve.limits import Limits

log = logging.getLogger("fine_infer.serve")
FD_HEADROOM = 64  # descriptors beyond the connections: the listener, the bundle's and index's files, threads, logs

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


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (uvicorn listens on it). A busy port or a bad address is one
    :class:`ConfigError` line, raised before the bundle is loaded."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ConfigError(f"cannot listen on {host}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart need not wait out TIME_WAIT
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {port} on {host} is in use (another server?): stop it or pick another "
                              "port with --port") from None
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    return sock


def ensure_descriptors(limits: Limits) -> None:
    """Raise this process's open-file limit to hold ``max_connections`` (plus headroom) when it is lower and the
    hard limit allows; else refuse in one line: a cap the process cannot reach would fail accepts instead."""
    import resource

    need = limits.max_connections + FD_HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            raise ConfigError(f"max_connections = {limits.max_connections} needs {need} open files but this process "
                              f"may open at most {hard} (ulimit -n): lower --max-connections")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def _limits_of(app: Any) -> Limits:
    state = getattr(getattr(app, "state", None), "serve", None)
    return state.limits if state is not None else Limits()


def _config(app: Any, host: str, port: int, log_level: str, access_log: bool, graceful_s: float):
    import uvicorn

    from fine_infer.serve.connections import protocol_for

    state = getattr(getattr(app, "state", None), "serve", None)
    limits = _limits_of(app)
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                          timeout_graceful_shutdown=graceful_s, lifespan="on", server_header=False,
                          http=protocol_for(limits, getattr(state, "metrics", None)),
                          timeout_keep_alive=limits.idle_timeout_s)


def run(
    app: Any,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    sock: socket.socket | None = None,
    api_key: str | None = None,
    log_level: str = "info",
    access_log: bool = False,
    graceful_s: float = 30.0,
) -> bool:
    """Serve ``app`` until SIGINT/SIGTERM; then stop accepting, finish in-flight requests (up to ``graceful_s``),
    and drain the batcher. ``sock``: the socket to listen on (:func:`bind_socket`; default: bound here).

    Returns whether the drain was clean (every request answered, nothing forced). uvicorn re-raises the signal it
    stopped on once drained, so a stopped service would exit 143 (killed by SIGTERM); a drained SIGTERM is how a
    service is meant to stop, so here it meets a handler that lets the process exit normally (0 from the CLI)."""
    import uvicorn

    check_bind(host, api_key)
    limits = _limits_of(app)
    ensure_descriptors(limits)
    sock = sock if sock is not None else bind_socket(host, port)
    # Everything loaded so far (model, tokenizer, the index and its metadata) lives as long as the server: keep it
    # out of the garbage collector's scans, which otherwise walk it again in every full collection.
    gc.collect()
    gc.freeze()
    server = uvicorn.Server(_config(app, host, port, log_level, access_log, graceful_s))

    def stop(signum: int, frame: Any) -> None:  # before uvicorn's own handler is in, and the re-raised signal after
        server.should_exit = True

    previous = signal.signal(signal.SIGTERM, stop) if threading.current_thread() is threading.main_thread() else None
    try:
        server.run(sockets=[sock])
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    state = getattr(app.state, "serve", None)
    return not server.force_exit and (state is None or state.drained)


def wait_ready(url: str, timeout: float = 60.0, died: Callable[[], str | None] | None = None,
               path: str = "/readyz") -> None:
    """Poll ``url`` + ``path`` until it answers 200, bounded by ``timeout``; ``died()``, when given, says why the
    server is gone (then RuntimeError at once) or None while it runs. (Another server's health route: ``path``.)"""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        why = died() if died is not None else None
        if why:
            raise RuntimeError(f"the server at {url} is gone: {why}")
        try:
            if httpx.get(url + path, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not become ready in {timeout} s")


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
        self.sock = bind_socket(host, port)
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
        wait_ready(self.url, timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Graceful stop: as on SIGTERM."""
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
