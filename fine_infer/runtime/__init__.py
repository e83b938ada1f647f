"""Running bundles: :func:`load` returns a :class:`Session` over one backend (ONNX Runtime or PyTorch)."""

from fine_infer.runtime.base import Runner, check_feeds
from fine_infer.runtime.session import BACKENDS, Session, load

__all__ = ["BACKENDS", "Runner", "Session", "check_feeds", "load"]
