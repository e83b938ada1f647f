"""The machine a bench result was measured on: CPU and GPU model, cores, thread settings and library versions."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
from importlib import metadata
from typing import Any

from fine_infer._cpu import cpu_signature
from fine_infer.bundle import tool_versions


def machine_info() -> dict[str, Any]:
    """CPU and GPU model, core counts, thread settings and library versions of this machine."""
    signature = cpu_signature()
    versions = tool_versions()
    for pkg in ("openvino", "fastapi", "starlette", "uvicorn", "pydantic", "httptools", "uvloop"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    info: dict[str, Any] = {
        "cpu": signature["cpu"],
        "cpu_count": os.cpu_count(),
        "cpu_affinity": signature["cores"],
        "gpu": None,
        "platform": platform.platform(),
        "threads": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
        "versions": versions,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if "torch" in sys.modules:  # never import torch just to describe the machine (the runtime extra has none)
        torch = sys.modules["torch"]
        info["threads"]["torch_intra_op"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info
