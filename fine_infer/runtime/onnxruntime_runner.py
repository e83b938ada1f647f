"""ONNX Runtime backend. Imports no torch, so a CPU edge box can run bundles with the `runtime` extra only."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fine_infer.errors import BackendUnavailableError, BundleError
from fine_infer.runtime.base import Runner
from fine_infer.specs import GraphSpec

DEFAULT_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


def _ort():
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendUnavailableError("onnxruntime is not installed: pip install 'fine-infer[runtime]'") from exc
    return onnxruntime


class OnnxRuntimeRunner(Runner):
    """Runs one ONNX file with ONNX Runtime; ``provider`` is what the session really uses, not what is available."""

    backend = "onnxruntime"

    def __init__(
        self,
        spec: GraphSpec,
        path: str | Path,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        session_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(spec)
        ort = _ort()
        available = set(ort.get_available_providers())
        wanted = [p for p in (providers or DEFAULT_PROVIDERS) if p in available] or ["CPUExecutionProvider"]
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # errors only: shape warnings are not the user's business
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(
                os.fspath(path), sess_options=opts, providers=wanted, **(session_kwargs or {})
            )
        except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated types for a bad model
            raise BundleError(f"ONNX Runtime cannot load {path}: {exc}") from None
        self._outputs = [o.name for o in self.session.get_outputs()]

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    @property
    def providers(self) -> list[str]:
        """Every provider the session runs on, in priority order."""
        return list(self.session.get_providers())

    def _run_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(self._outputs, feeds)
        return dict(zip(self._outputs, values))
