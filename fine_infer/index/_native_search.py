"""The one module that imports the native search core (``fine_infer._native``, built from ``cpp/``).

Everything else in fine-infer calls these thin wrappers. They assume validated arguments (the :class:`Index` checks
shapes, dtypes and values and raises friendly errors); the native side checks again and raises ``ValueError``.
"""

from __future__ import annotations

import numpy as np

try:
    from fine_infer import _native
except ImportError as exc:  # an sdist or checkout without a build, or a build for another Python
    raise ImportError(
        "fine_infer._native (the C++ search core) is not built or does not load here "
        f"({exc}). Install the package with pip (`pip install .`, or for development "
        "`pip install --no-build-isolation -e .`), which compiles cpp/ with CMake and a C++17 compiler."
    ) from exc

#: Gallery slots per storage panel: vectors are stored as (panels, dim, PANEL) so the kernels stream them.
PANEL: int = int(_native.PANEL)


def search(queries: np.ndarray, panels: np.ndarray, n: int, k: int, scales: np.ndarray | None,
           threads: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` inner products of float32 ``queries`` (Q, dim) against the first ``n`` slots of ``panels``.

    Returns ``(scores float32 (Q, k), slots int64 (Q, k))``, best first, ``-inf`` / ``-1`` past ``n``. ``scales`` is
    the per-dimension scale of an int8 gallery. The GIL is released while it runs."""
    return _native.search(queries, panels, int(n), int(k), scales, int(threads))


def rescore(queries: np.ndarray, rows: np.ndarray, candidates: np.ndarray, k: int,
            threads: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact float32 scores of each query's candidate slots (rows of ``rows``), best ``k`` first; ``-1`` skipped."""
    return _native.rescore(queries, rows, candidates, int(k), int(threads))


def active_isa() -> str:
    """The instruction set the kernels run with: ``"avx512"``, ``"avx2"`` or ``"generic"``."""
    return str(_native.active_isa())


def available_isas() -> list[str]:
    """The instruction sets this build can run on this CPU, best first."""
    return [str(s) for s in _native.available_isas()]


def set_isa(name: str) -> None:
    """Force the kernels' instruction set (tests, benchmarks). ``FINE_INFER_ISA`` does the same at start-up."""
    if not _native.set_isa(name):
        raise ValueError(f"instruction set {name!r} is not available here; available: {available_isas()}")
