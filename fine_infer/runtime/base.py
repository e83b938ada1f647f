"""The one small interface every backend implements (after Polygraphy's runners).

A runner executes one graph of a bundle: ``run(feeds) -> outputs`` on numpy arrays, named as in the graph spec.
The public :meth:`Runner.run` checks the feeds against the spec (names, dtypes, ranks, static dims, NaN) so a
backend only implements :meth:`Runner._run_impl` and reports what really executes in :attr:`Runner.provider`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from fine_infer.errors import InputError
from fine_infer.specs import GraphSpec


class Runner(ABC):
    """Runs one graph. Subclasses set ``backend`` and implement ``_run_impl`` and ``provider``."""

    backend: str = ""

    def __init__(self, spec: GraphSpec) -> None:
        self.spec = spec

    @property
    @abstractmethod
    def provider(self) -> str:
        """What actually executes the graph (e.g. ``CPUExecutionProvider``, ``torch-cpu``)."""

    @abstractmethod
    def _run_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Execute on validated feeds; return outputs by name as numpy arrays."""

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate ``feeds`` against the graph spec, run, and return float32/int outputs by name."""
        return self._run_impl(check_feeds(self.spec, feeds))

    def close(self) -> None:
        """Release backend resources (optional)."""


def check_feeds(spec: GraphSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Check names, dtypes, ranks, static dims, a consistent batch, and finiteness; return the feeds in spec order."""
    expected = [t.name for t in spec.inputs]
    missing = [n for n in expected if n not in feeds]
    extra = [n for n in feeds if n not in expected]
    if missing or extra:
        raise InputError(
            f"graph {spec.name!r} takes inputs {expected}; missing {missing or 'none'}, unexpected {extra or 'none'}"
        )
    out: dict[str, np.ndarray] = {}
    axis_sizes: dict[str, int] = {}
    for t in spec.inputs:
        arr = np.asarray(feeds[t.name])
        if arr.dtype != np.dtype(t.dtype):
            if np.can_cast(arr.dtype, t.dtype, casting="same_kind"):
                arr = arr.astype(t.dtype)
            else:
                raise InputError(f"input {t.name!r} is {arr.dtype}; graph {spec.name!r} needs {t.dtype}")
        if arr.ndim != len(t.shape):
            raise InputError(f"input {t.name!r} has shape {arr.shape}; graph {spec.name!r} needs {tuple(t.shape)}")
        for i, (size, want) in enumerate(zip(arr.shape, t.shape)):
            if isinstance(want, int) and size != want:
                raise InputError(f"input {t.name!r} has shape {arr.shape}; dim {i} must be {want} ({tuple(t.shape)})")
            if isinstance(want, str):
                if size < 1:
                    raise InputError(f"input {t.name!r} has an empty dim {i} ({want})")
                if axis_sizes.setdefault(want, size) != size:
                    raise InputError(f"inputs disagree on {want!r}: {axis_sizes[want]} vs {size} in {t.name!r}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise InputError(f"input {t.name!r} contains NaN or infinity")
        out[t.name] = np.ascontiguousarray(arr)
    return out
