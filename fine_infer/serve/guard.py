"""The app's outermost layer, as pure ASGI middleware (cheaper than ``BaseHTTPMiddleware``): the API key, the body
size limit (by ``Content-Length`` and while a body streams), the body read timeout, admission (at most
``max_queue`` work requests at once once their bodies are in, 429 beyond), the request timeout, request metrics, and a
JSON 500 for anything unhandled. A client that goes away before its answer is a disconnect (metric label ``status="disconnected"``, one
debug line), not an error.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
from typing import Any

from starlette.requests import ClientDisconnect

from fine_infer.serve.limits import RETRY_AFTER_S, LimitExceeded, Limits, ServeError
from fine_infer.serve.state import ServeState

log = logging.getLogger("fine_infer.serve")

PROTECTED_PREFIXES = ("/v1/", "/metrics")  # need the API key when one is set; health and the schema do not
WORK_PREFIX = "/v1/"  # POSTs under it are admitted against max_queue once their body is in
_ADDRESS = re.compile(r"<([\w.]+) object at 0x[0-9a-fA-F]+>")


def error_body(err: ServeError) -> bytes:
    """The JSON error document of ``err``, with any object address (``<x object at 0x..>``) taken out."""
    body = err.body()
    body["error"]["message"] = _ADDRESS.sub(r"\1", body["error"]["message"])
    return json.dumps(body, separators=(",", ":")).encode()


def error_headers(err: ServeError, length: int) -> list[tuple[bytes, bytes]]:
    """The response headers of an error answer: JSON, its length, and the error's own (Retry-After, ...)."""
    return [(b"content-type", b"application/json"), (b"content-length", str(length).encode()),
            *((k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in err.headers.items())]


class ReadTimeout(ServeError):
    """The body did not arrive within ``read_timeout_s`` (HTTP 408; the connection is closed)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"the request body did not arrive within {seconds:g} s (limit read_timeout_s)",
                         status=408, type="request_timeout", limit="read_timeout_s", limit_value=seconds,
                         headers={"Connection": "close"})


class Guard:
    """Pure ASGI middleware (cheaper than BaseHTTPMiddleware): API key, body size and read time, admission,
    request timeout, metrics, JSON 500s."""

    def __init__(self, app: Any, state: ServeState, paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.state = state
        self.paths = paths  # label requests answered before routing (401, 413) by path when it is a known one
        self.admitted = 0  # work requests with their body in, being served now (the event loop's only: no lock)
        self.held = 0  # body bytes received by requests not finished yet (the event loop's only: no lock)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        st = self.state
        lim = st.limits
        t0 = time.perf_counter()
        status: int | str = 500
        started = False

        async def send_wrapper(message: dict) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = message["status"]
                started = True
            await send(message)

        admitted = False
        timer = asyncio.timeout(lim.request_timeout_s)
        held = 0  # this request's share of self.held

        def hold(n: int) -> None:
            """Count ``n`` more body bytes held; refuse (503) past max_body_bytes_held over all requests."""
            nonlocal held
            held += n
            self.held += n
            if self.held > lim.max_body_bytes_held:
                raise LimitExceeded("max_body_bytes_held", lim.max_body_bytes_held, "the server holds too many "
                                    f"request bodies at once; retry after {RETRY_AFTER_S} s", 503,
                                    headers={"Retry-After": str(RETRY_AFTER_S), "Connection": "close"})

        def admit() -> None:
            """Called once the body is in: a slow upload holds a connection (read_timeout_s bounds it), not a place
            in the queue of work."""
            nonlocal admitted
            if self.admitted >= lim.max_queue:
                raise LimitExceeded("max_queue", lim.max_queue, f"the server is busy: {self.admitted} requests are "
                                    f"in progress; retry after {RETRY_AFTER_S} s", 429,
                                    headers={"Retry-After": str(RETRY_AFTER_S)})
            self.admitted += 1
            admitted = True

        st.metrics.in_flight.inc()
        try:
            path = scope["path"]
            if st.api_key is not None and path.startswith(PROTECTED_PREFIXES) and not self._authorised(scope):
                await send_error(send_wrapper, ServeError("missing or wrong API key: send 'Authorization: Bearer "
                                                          "KEY' or 'X-API-Key: KEY'", status=401, type="unauthorized"))
                return
            length = _header(scope, b"content-length")
            if length is not None:
                try:
                    lim.check_body_length(int(length))
                except ValueError:
                    await send_error(send_wrapper, ServeError("bad Content-Length header", type="bad_request"))
                    return
                except LimitExceeded as exc:
                    await send_error(send_wrapper, exc)
                    return
            work = scope["method"] == "POST" and path.startswith(WORK_PREFIX)
            async with timer:
                await self.app(scope, _guarded_receive(receive, lim, hold, admit if work else None), send_wrapper)
        except TimeoutError:
            if not timer.expired():
                raise
            if not started:
                await send_error(send_wrapper, ServeError(
                    f"the request took longer than {lim.request_timeout_s:g} s (limit request_timeout_s)", status=504,
                    type="timeout", limit="request_timeout_s", limit_value=lim.request_timeout_s,
                    headers={"Connection": "close"}))
        except asyncio.CancelledError:  # the graceful shutdown ran out of time: this request is not answered
            st.cancelled += 1
            status = "cancelled"
            raise
        except ClientDisconnect:
            status = "disconnected"
            log.debug("client went away during %s %s", scope["method"], scope["path"])
        except Exception as exc:  # noqa: BLE001 - the client gets a JSON 500; the log gets the traceback
            log.exception("unhandled error on %s", scope.get("path"))
            if not started:
                await send_error(send_wrapper, ServeError(f"internal error ({type(exc).__name__})", status=500,
                                                          type="internal"))
        finally:
            self.held -= held
            if admitted:
                self.admitted -= 1
            st.metrics.in_flight.dec()
            route = getattr(scope.get("route"), "path", None)
            if route is None:
                route = scope["path"] if scope["path"] in self.paths else "unmatched"  # bounded label values
            st.metrics.observe_request(route, scope["method"], status, time.perf_counter() - t0)

    def _authorised(self, scope: dict) -> bool:
        key = _header(scope, b"x-api-key")
        if key is None:
            auth = _header(scope, b"authorization") or ""
            key = auth[7:] if auth[:7].lower() == "bearer " else None
        return key is not None and hmac.compare_digest(key.encode(), self.state.api_key)


def _header(scope: dict, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return v.decode("latin-1")
    return None


def _guarded_receive(receive: Any, limits: Limits, hold: Any, admit: Any = None) -> Any:
    """A receive() that refuses a body growing past ``max_body_bytes`` while it streams (chunked bodies have no
    length), and one not all arrived within ``read_timeout_s`` of the headers (408); each chunk is counted by
    ``hold(bytes)`` (which may refuse: 503); once the body is in, ``admit()`` (which may refuse: 429)."""
    seen = 0
    done = False
    deadline = time.monotonic() + limits.read_timeout_s

    async def wrapped() -> dict:
        nonlocal seen, done
        if done:  # the body is in: what follows is only the disconnect, waited for as long as the app likes
            return await receive()
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                message = await receive()
        except TimeoutError:
            raise ReadTimeout(limits.read_timeout_s) from None
        if message["type"] == "http.request":
            chunk = len(message.get("body", b""))
            seen += chunk
            limits.check_body_length(seen)
            hold(chunk)
            done = not message.get("more_body", False)
            if done and admit is not None:
                admit()
        return message

    return wrapped


async def send_error(send: Any, err: ServeError) -> None:
    """Answer ``err`` as JSON."""
    body = error_body(err)
    await send({"type": "http.response.start", "status": err.status, "headers": error_headers(err, len(body))})
    await send({"type": "http.response.body", "body": body})
