"""``fine-infer serve``: an HTTP JSON API over a bundle (and an index), with cross-request batching.

Needs the ``serve`` extra (FastAPI, uvicorn, prometheus-client, python-multipart). Nothing in fine-infer imports
this package; it sits on top of the runtime, the batching and the index.
"""

from fine_infer.serve.app import classify_outputs, create_app
from fine_infer.serve.limits import LimitExceeded, Limits, ServeError
from fine_infer.serve.server import ServerThread, check_bind, is_loopback, run
from fine_infer.serve.state import ServeState

__all__ = ["LimitExceeded", "Limits", "ServeError", "ServeState", "ServerThread", "check_bind", "classify_outputs",
           "create_app", "is_loopback", "run"]
