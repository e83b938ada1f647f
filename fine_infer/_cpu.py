"""How many cores this process may use (one place for the runtime, the index and tune)."""

from __future__ import annotations

import os


def cpu_cores() -> int:
    """Cores this process may run on: its affinity mask where the OS has one (respects taskset and container CPU
    sets), else the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)
