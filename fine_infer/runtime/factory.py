"""The one place runners are built: a graph of a bundle, an :class:`~fine_infer.runtime.paths.ExecPath`, and the
options of its backend. Each backend's heavy import happens inside its runner module, on first use."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from fine_infer.bundle import Bundle
from fine_infer.bundle.variants import ort_session_kwargs, resolve_variant
from fine_infer.errors import ConfigError
from fine_infer.runtime.base import Runner
from fine_infer.runtime.paths import ExecPath, bundle_variant


def make_runner(
    bundle: Bundle,
    graph: str,
    path: ExecPath,
    *,
    providers: Sequence[str] | None = None,
    device: str = "cpu",
    threads: int | None = None,
    hint: str | None = None,
    model: Callable[[], Any] | None = None,
) -> Runner:
    """A runner of ``graph`` on ``path``.

    ``providers``: ONNX Runtime execution providers in priority order (default CUDA, then CPU); ``device``: ``cpu`` or
    ``cuda[:N]`` (PyTorch, TensorRT); ``threads``: intra-op threads of ONNX Runtime or OpenVINO; ``hint``: OpenVINO's
    performance hint (default ``latency``); ``model``: returns the bundle's PyTorch model (the torch backend)."""
    entry = bundle.graph(graph)
    if path.backend == "openvino":
        from fine_infer.runtime.openvino_runner import OpenVINORunner, variant_precision

        return OpenVINORunner(entry.spec, resolve_variant(bundle, entry, bundle_variant(path), "openvino"),
                              variant_precision(path.variant), hint or "latency", threads)
    if path.backend == "tensorrt":
        from fine_infer.runtime.tensorrt_runner import TensorRTRunner

        return TensorRTRunner(entry.spec, resolve_variant(bundle, entry, path.variant, "tensorrt"),
                              device=cuda_index(device))
    if path.backend == "onnxruntime":
        from fine_infer.runtime.onnxruntime_runner import OnnxRuntimeRunner

        return OnnxRuntimeRunner(entry.spec, resolve_variant(bundle, entry, path.variant), providers, threads,
                                 session_kwargs=ort_session_kwargs(path.variant))
    if path.backend == "torch":
        from fine_infer.runtime.torch_runner import TorchRunner, model_from_bundle

        return TorchRunner(entry.spec, model() if model is not None else model_from_bundle(bundle), device,
                           path.kernels)
    raise ConfigError(f"no runner for backend {path.backend!r}")


def cuda_index(device: str) -> int:
    """``"cuda:1"`` → 1; ``"cuda"``/``"cpu"`` → 0 (TensorRT always runs on a CUDA device)."""
    _, _, idx = device.partition(":")
    return int(idx) if idx.isdigit() else 0
