"""Running bundles: :func:`load` returns a :class:`Session` over one backend (ONNX Runtime, OpenVINO, TensorRT or
PyTorch), built by one runner factory (:mod:`~fine_infer.runtime.factory`) from the paths named in
:mod:`~fine_infer.runtime.paths`. ``backend="auto"`` reads the bundle's stored choice (:mod:`~fine_infer.runtime.choice`);
nothing here times anything or imports export or the tools."""

from fine_infer.runtime.base import Runner, check_feeds
from fine_infer.runtime.paths import BACKENDS, CPU_PATHS, PATHS, ExecPath
from fine_infer.runtime.session import Session, classify_outputs, load

__all__ = ["BACKENDS", "CPU_PATHS", "PATHS", "ExecPath", "Runner", "Session", "check_feeds", "classify_outputs", "load"]
