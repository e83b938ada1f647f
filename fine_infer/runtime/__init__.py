"""Running bundles: :func:`load` returns a :class:`Session` over one backend (ONNX Runtime, OpenVINO, TensorRT or
PyTorch); :class:`~fine_infer.runtime.batcher.DynamicBatcher` batches concurrent callers of one session."""

from fine_infer.runtime.base import Runner, check_feeds
from fine_infer.runtime.session import BACKENDS, Session, load

__all__ = ["BACKENDS", "Runner", "Session", "check_feeds", "load"]
