"""``fine-infer serve``: an HTTP JSON API over a bundle (and an index), with cross-request batching.

Needs the ``serve`` extra (FastAPI, uvicorn, prometheus-client, python-multipart). Nothing in fine-infer imports
this package; it sits on top of the runtime, the batching and the index. Its names load on first use, so the CLI
reads :class:`Limits` (its option defaults) without importing FastAPI.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "classify_outputs": "app", "create_app": "app",
    "LimitExceeded": "limits", "Limits": "limits", "ServeError": "limits",
    "ServerThread": "server", "bind_socket": "server", "check_bind": "server", "is_loopback": "server", "run": "server",
    "wait_ready": "server",
    "ServeState": "state",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'fine_infer.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(f"fine_infer.serve.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
