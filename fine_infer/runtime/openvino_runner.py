"""OpenVINO backend (CPU): runs the bundle's portable fp32 ONNX graph directly, in f32 or bf16, or the NNCF-calibrated
int8 IR an export wrote (``export --int8-static``: ``<graph>.openvino-int8.xml`` and its ``.bin``).

Imports no torch, and ``openvino`` only when a runner is created (the ``openvino`` extra), so a CPU edge box can run
bundles with ``pip install 'fine-infer[openvino]'`` and no PyTorch.

- **Inference precision** (``INFERENCE_PRECISION_HINT``): ``f32`` or ``bf16``. OpenVINO's CPU plugin *defaults* to
  bf16 on CPUs that have it (AVX-512 BF16, AMX), so ``f32`` is always set explicitly: the fp32 variant really is fp32.
  bf16 needs ``BF16`` in the device's ``OPTIMIZATION_CAPABILITIES``; :func:`precision_unsupported` says why not
  otherwise (callers that enumerate CPU paths skip it with that reason; an explicit request raises it).
- **int8**: the int8 IR, with the ops NNCF left in float (and the graph's quantise/dequantise arithmetic) at f32
  inference precision, so the path's precision does not depend on whether the CPU has bf16. Needs ``INT8`` in
  ``OPTIMIZATION_CAPABILITIES`` (every x86 CPU OpenVINO supports reports it; without VNNI/AMX the int8 kernels gain
  little: see benchmarks/RESULTS.md).
- **Performance hint** (``PERFORMANCE_HINT``): ``latency`` (one stream over every core: the fastest single call) or
  ``throughput`` (several streams: more items/s when several callers run at once).

Concurrent callers each take an ``InferRequest`` from a small pool, bounded by the compiled model's
``OPTIMAL_NUMBER_OF_INFER_REQUESTS`` (1 under the latency hint, one per stream under the throughput hint), so the
runner is thread-safe and never builds more requests than the device runs at once.
"""

from __future__ import annotations

import os
import queue
import threading
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from fine_infer.errors import BackendUnavailableError, BundleError, ConfigError
from fine_infer.runtime.base import Runner
from fine_infer.specs import GraphSpec

# Session variant name -> OpenVINO precision. fp32 and bf16 run the portable fp32 graph at that inference precision;
# int8 runs the bundle's int8 IR (its float ops at f32).
VARIANT_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "int8"}
# OpenVINO precision -> the OPTIMIZATION_CAPABILITIES entry a device needs for it.
PRECISION_CAPABILITY = {"f32": "FP32", "bf16": "BF16", "int8": "INT8"}
HINTS = ("latency", "throughput")
DEVICE = "CPU"

_core_lock = threading.Lock()
_core: Any = None


def require_openvino():
    try:
        import openvino
    except ImportError as exc:
        raise BackendUnavailableError("OpenVINO is not installed: pip install 'fine-infer[openvino]'") from exc
    return openvino


def core() -> Any:
    """The process-wide ``openvino.Core`` (created on first use; OpenVINO recommends one per process)."""
    global _core
    with _core_lock:
        if _core is None:
            _core = require_openvino().Core()
        return _core


def device_capabilities(device: str = DEVICE) -> frozenset[str]:
    """What ``device`` reports in ``OPTIMIZATION_CAPABILITIES`` (e.g. ``{"FP32", "BF16", "INT8", ...}``)."""
    return frozenset(core().get_property(device, "OPTIMIZATION_CAPABILITIES"))


def precision_unsupported(precision: str, capabilities: Iterable[str] | None = None, device: str = DEVICE) -> str:
    """Why ``device`` cannot run ``precision`` ("" when it can).

    ``capabilities`` overrides what the device reports (default: :func:`device_capabilities`), so callers and tests
    can ask about another CPU without touching OpenVINO's inference."""
    if precision not in PRECISION_CAPABILITY:
        raise ConfigError(f"unknown OpenVINO precision {precision!r}; choose one of {', '.join(PRECISION_CAPABILITY)}")
    caps = frozenset(capabilities) if capabilities is not None else device_capabilities(device)
    need = PRECISION_CAPABILITY[precision]
    if need in caps:
        return ""
    example = "e.g. AVX-512 BF16 or AMX" if precision == "bf16" else "an x86 CPU OpenVINO supports"
    return (f"this {device} cannot run {precision} (OpenVINO reports OPTIMIZATION_CAPABILITIES "
            f"{', '.join(sorted(caps)) or 'none'}; {precision} needs {need}, {example}); use f32")


def variant_precision(variant: str | None) -> str:
    """The OpenVINO precision of a session variant (``None``/``fp32`` → ``f32``, ``bf16`` → ``bf16``, ``int8`` →
    ``int8``: the bundle's int8 IR)."""
    v = variant or "fp32"
    if v not in VARIANT_PRECISION:
        raise ConfigError(
            f"the openvino backend runs the portable fp32 graph as variant 'fp32' or 'bf16' (its inference "
            f"precision) or the int8 IR as 'int8', not {v!r}"
            + ("; int8-static and cpu-opt are ONNX Runtime graphs: use backend='onnxruntime'"
               if v in ("int8-static", "cpu-opt") else "")
        )
    return VARIANT_PRECISION[v]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


class OpenVINORunner(Runner):
    """Runs one ONNX file or OpenVINO IR with OpenVINO on the CPU at ``precision`` (``f32``/``bf16``; ``int8``: an
    int8 IR whose float ops run at f32) under ``hint``.

    ``threads`` caps ``INFERENCE_NUM_THREADS`` (default: OpenVINO's, one per core). ``capabilities`` overrides the
    device's reported ``OPTIMIZATION_CAPABILITIES`` for the precision check. ``provider`` reports what the compiled
    model says it runs on and in which precision, not what was asked for."""

    backend = "openvino"

    def __init__(
        self,
        spec: GraphSpec,
        path: str | Path,
        precision: str = "f32",
        hint: str = "latency",
        threads: int | None = None,
        capabilities: Iterable[str] | None = None,
    ) -> None:
        super().__init__(spec)
        if hint not in HINTS:
            raise ConfigError(f"unknown OpenVINO performance hint {hint!r}; choose one of {', '.join(HINTS)}")
        why = precision_unsupported(precision, capabilities)
        if why:
            raise BackendUnavailableError(why)
        ov = require_openvino()
        import openvino.properties as props
        import openvino.properties.hint as hints

        try:
            model = core().read_model(os.fspath(path))
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses with long texts
            raise BundleError(f"OpenVINO cannot read {path}: {_first_line(exc)}") from None
        config: dict[Any, Any] = {
            hints.inference_precision: ov.Type.bf16 if precision == "bf16" else ov.Type.f32,
            hints.performance_mode: (hints.PerformanceMode.THROUGHPUT if hint == "throughput"
                                     else hints.PerformanceMode.LATENCY),
        }
        if threads:
            config[props.inference_num_threads] = int(threads)
        try:
            self.compiled = core().compile_model(model, DEVICE, config)
        except Exception as exc:  # noqa: BLE001
            raise BackendUnavailableError(f"OpenVINO cannot compile {Path(path).name} for {DEVICE}: "
                                          f"{_first_line(exc)}") from None
        self.precision, self.hint = precision, hint
        names = {n for port in self.compiled.inputs for n in port.get_names()}
        self._inputs = [t.name for t in spec.inputs if t.name in names]  # an input the graph ignores may be pruned
        try:
            self._outputs = [(t.name, self.compiled.output(t.name)) for t in spec.outputs]
        except Exception as exc:  # noqa: BLE001
            raise BundleError(f"{path} does not have the outputs its manifest lists "
                              f"({[t.name for t in spec.outputs]}): {_first_line(exc)}") from None
        self.max_requests = max(1, int(self.compiled.get_property(props.optimal_number_of_infer_requests())))
        self._slots = threading.BoundedSemaphore(self.max_requests)
        self._idle: queue.SimpleQueue = queue.SimpleQueue()

    @property
    def provider(self) -> str:
        """``OpenVINO-CPU-bf16``: the execution devices and inference precision the compiled model reports
        (``OpenVINO-CPU-f32-int8`` for the int8 IR)."""
        import openvino.properties as props
        import openvino.properties.hint as hints

        devices = "+".join(self.compiled.get_property(props.execution_devices()))
        precision = self.compiled.get_property(hints.inference_precision()).get_type_name()
        return f"OpenVINO-{devices}-{precision}" + ("-int8" if self.precision == "int8" else "")

    def info(self) -> dict[str, Any]:
        """The compiled model's settings: precision, hint, streams, threads, infer requests, devices."""
        import openvino.properties as props

        return {"provider": self.provider, "precision": self.precision, "hint": self.hint,
                "streams": int(self.compiled.get_property("NUM_STREAMS")),
                "threads": int(self.compiled.get_property(props.inference_num_threads())),
                "infer_requests": self.max_requests, "openvino": require_openvino().__version__}

    def _run_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._slots:
            try:
                request = self._idle.get_nowait()
            except queue.Empty:
                request = self.compiled.create_infer_request()
            try:
                request.infer({name: feeds[name] for name in self._inputs})
                out: dict[str, np.ndarray] = {}
                for name, port in self._outputs:
                    data = request.get_tensor(port).data
                    # np.array copies: the request's output tensors are reused by its next call.
                    out[name] = np.array(data, dtype=np.float32 if data.dtype.kind == "f" else data.dtype)
                return out
            finally:
                self._idle.put(request)

    def close(self) -> None:
        """Drop the infer requests and the compiled model."""
        while True:
            try:
                self._idle.get_nowait()
            except queue.Empty:
                break
        self.compiled = None
