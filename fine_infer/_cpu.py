"""This machine's CPU: how many cores this process may use, and its model (one place for the runtime, the index,
the batcher, tune and bench)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def cpu_cores() -> int:
    """Cores this process may run on: its affinity mask where the OS has one (respects taskset and container CPU
    sets), else the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def cpu_signature() -> dict[str, Any]:
    """This machine's CPU model and usable cores: a tune result measured on another CPU is not trusted."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": cpu_cores()}
