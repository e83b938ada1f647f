"""Connections: how many may be open, and how long each may take to say what it wants.

uvicorn's HTTP protocols (0.55, read in its source) time only an idle keep-alive connection (``timeout_keep_alive``,
armed after a response): a connection that never sends a byte, or sends half its headers, or half its body, stays
open for ever; ``limit_concurrency`` answers 503 to *requests* once the connections reach it, but accepts and keeps
every connection (each holds a file descriptor), and ``h11_max_incomplete_event_size`` bounds only the h11 parser's
buffer. So the server runs on :class:`GuardedHttpProtocol`, uvicorn's httptools protocol with, per connection:

- a cap: past ``max_connections`` open ones, a new connection is answered 503 (``Retry-After``) and closed at once;
- an idle timer: a new connection that sends nothing for ``idle_timeout_s`` is closed (after a response, uvicorn's
  own keep-alive timer, set to the same value, does this);
- a header timer and budget: from a request's first byte its headers must be in within ``read_timeout_s`` and
  ``max_header_bytes`` (408 / 431, then closed), counted both as the bytes arrive (a head sent slowly) and as the
  parser hands over the request line and each header (a head sent in one read);
- a body backstop: the app answers a body slower than ``read_timeout_s`` with 408 (:mod:`fine_infer.serve.guard`,
  which reads it); should the app not be reading, the connection is closed a second after that.
- a request the parser refuses answered 400 in the documented JSON error shape (uvicorn's is plain text), also when
  its headers were in but its framing (chunk sizes, a body longer than its Content-Length) is broken;
- after a request answered before its body was read (401, 413, 415), the idle timer again once the body is in:
  uvicorn's keep-alive timer is armed at the answer and cancelled by the body's bytes.

Each refusal and timeout is counted (``fine_infer_connections_refused_total``,
``fine_infer_connection_timeouts_total{phase}``) and ``fine_infer_connections_open`` gauges the open ones.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from fine_infer.serve.limits import RETRY_AFTER_S, Limits

BODY_GRACE_S = 1.0  # the backstop closes a slow body this long after the app's own 408 would have answered it
_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large",
            503: b"Service Unavailable"}


def _answer(status: int, kind: str, message: str, limit: str | None = None, value: float = 0,
            retry: bool = False) -> bytes:
    """A whole HTTP/1.1 error response (the documented JSON error shape) that closes the connection."""
    err: dict[str, Any] = {"type": kind, "message": message}
    if limit is not None:
        err.update(message=f"{message} (limit {limit} = {value:g})", limit=limit, limit_value=value)
    body = json.dumps({"error": err}, separators=(",", ":")).encode()
    head = [b"HTTP/1.1 %d %s" % (status, _REASONS[status]), b"content-type: application/json",
            b"content-length: %d" % len(body), b"connection: close"]
    if retry:
        head.append(b"retry-after: %d" % RETRY_AFTER_S)
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a connection cap, an idle timer, a header timer and budget and a body
    backstop (module docstring). Subclassed per server by :func:`protocol_for`, which sets the class attributes."""

    limits: Limits = Limits()
    metrics: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._in_headers = True  # between requests, and until a request's headers are complete
        self._header_bytes = 0  # bytes of reads that left the head incomplete
        self._parsed_bytes = 0  # bytes of the request line and headers the parser handed over
        self._too_large = False
        self._started = False  # a byte of the current request has arrived

    # --- asyncio.Protocol -------------------------------------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        m = self.metrics
        if m is not None:
            m.connections_open.inc()
        if len(self.connections) > self.limits.max_connections:
            if m is not None:
                m.connections_refused.inc()
            self._close(_answer(503, "too_many_connections", f"{len(self.connections) - 1} connections are open; "
                                f"retry after {RETRY_AFTER_S} s", "max_connections", self.limits.max_connections,
                                retry=True))
            return
        self._arm(self.limits.idle_timeout_s, "idle")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self.metrics is not None:
            self.metrics.connections_open.dec()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._in_headers and self._started and not self.transport.is_closing():
            self._header_bytes += len(data)  # this chunk left the headers incomplete: all of it was headers
            if self._header_bytes > self.limits.max_header_bytes:
                self._timeout_or_refuse("headers_too_large")

    def send_400_response(self, msg: str) -> None:
        """A request the parser refuses: answered in the documented error shape (uvicorn's is plain text)."""
        if self._too_large:  # the parser stopped because a callback below found the head over its budget
            self._timeout_or_refuse("headers_too_large")
            return
        self._close(_answer(400, "bad_request", f"malformed HTTP request ({msg.rstrip('.')})"))

    # --- httptools parser callbacks ---------------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers, self._started, self._header_bytes, self._parsed_bytes = True, True, 0, 0
        self._arm(self.limits.read_timeout_s, "headers")

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._count_parsed(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._count_parsed(len(name) + len(value) + 4)  # ": " and CRLF

    def _count_parsed(self, n: int) -> None:
        self._parsed_bytes += n
        if self._parsed_bytes > self.limits.max_header_bytes:
            self._too_large = True
            raise ValueError("headers too large")  # stops the parser: send_400_response answers 431

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._disarm()
        super().on_headers_complete()
        if not self.pipeline:  # a queued (pipelined) request's body waits for its turn, through no fault of its own
            self._arm(self.limits.read_timeout_s + BODY_GRACE_S, "body")

    def on_message_complete(self) -> None:
        self._disarm()
        self._in_headers, self._started = True, False
        super().on_message_complete()
        if self.cycle is not None and self.cycle.response_complete and not self.transport.is_closing():
            self._arm(self.limits.idle_timeout_s, "idle")  # answered early; the body's bytes cancelled keep-alive

    # --- timers -----------------------------------------------------------------------------------------------------
    def _arm(self, seconds: float, phase: str) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._timeout_or_refuse, phase)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timeout_or_refuse(self, phase: str) -> None:
        self._timer = None
        if self.transport is None or self.transport.is_closing():
            return
        if self.metrics is not None:
            self.metrics.connection_timeouts.labels(phase).inc()
        lim = self.limits
        if phase == "headers":
            self._close(_answer(408, "request_timeout", "the request headers did not arrive in time",
                                "read_timeout_s", lim.read_timeout_s))
        elif phase == "headers_too_large":
            self._close(_answer(431, "limit_exceeded", "the request headers are too large", "max_header_bytes",
                                lim.max_header_bytes))
        else:  # idle: nothing to answer; body: the app's 408 did not come (it was not reading), or was sent
            self._close(b"")

    def _close(self, answer: bytes) -> None:
        # Answered only while no response is under way on this connection: the request refused has no cycle yet, or
        # its cycle has not started answering (broken framing after the headers), or the previous one is complete.
        cycle = self.cycle
        if answer and (cycle is None or cycle.response_complete or not cycle.response_started):
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True  # the app's own answer, if it comes, is not written after this one
            self.transport.write(answer)
        self.transport.close()  # a close after a write still sends what is buffered


def protocol_for(limits: Limits, metrics: Any) -> type[GuardedHttpProtocol]:
    """The protocol class of one server: :class:`GuardedHttpProtocol` bound to its limits and metrics."""
    return type("ServeHttpProtocol", (GuardedHttpProtocol,), {"limits": limits, "metrics": metrics})
