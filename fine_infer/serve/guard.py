"""The app's outermost layer, as pure ASGI middleware (cheaper than ``BaseHTTPMiddleware``): the API key, the body
size limit (by ``Content-Length`` and while a body streams), request metrics, and a JSON 500 for anything unhandled.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from typing import Any

from fine_infer.serve.limits import LimitExceeded, Limits, ServeError
from fine_infer.serve.state import ServeState

log = logging.getLogger("fine_infer.serve")

PROTECTED_PREFIXES = ("/v1/", "/metrics")  # need the API key when one is set; health and the schema do not


class Guard:
    """Pure ASGI middleware (cheaper than BaseHTTPMiddleware): API key, body size, metrics, JSON 500s."""

    def __init__(self, app: Any, state: ServeState, paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.state = state
        self.paths = paths  # label requests answered before routing (401, 413) by path when it is a known one

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        st = self.state
        t0 = time.perf_counter()
        status = 500
        started = False

        async def send_wrapper(message: dict) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = message["status"]
                started = True
            await send(message)

        st.metrics.in_flight.inc()
        try:
            path = scope["path"]
            if st.api_key is not None and path.startswith(PROTECTED_PREFIXES) and not self._authorised(scope):
                await _send_error(send_wrapper, ServeError("missing or wrong API key: send 'Authorization: Bearer "
                                                           "KEY' or 'X-API-Key: KEY'", status=401, type="unauthorized"))
                return
            length = _header(scope, b"content-length")
            if length is not None:
                try:
                    st.limits.check_body_length(int(length))
                except ValueError:
                    await _send_error(send_wrapper, ServeError("bad Content-Length header", type="bad_request"))
                    return
                except LimitExceeded as exc:
                    await _send_error(send_wrapper, exc)
                    return
            await self.app(scope, _counting_receive(receive, st.limits), send_wrapper)
        except Exception as exc:  # noqa: BLE001 - the client gets a JSON 500; the log gets the traceback
            log.exception("unhandled error on %s", scope.get("path"))
            if not started:
                await _send_error(send_wrapper, ServeError(f"internal error ({type(exc).__name__})", status=500,
                                                           type="internal"))
        finally:
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


def _counting_receive(receive: Any, limits: Limits) -> Any:
    """A receive() that refuses a body growing past the limit while it streams (chunked bodies have no length)."""
    seen = 0

    async def wrapped() -> dict:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            limits.check_body_length(seen)
        return message

    return wrapped


async def _send_error(send: Any, err: ServeError) -> None:
    body = json.dumps(err.body()).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
