"""TensorRT backend: runs a bundle's engine (built on this device by ``fine-infer build-engine``).

Written to the TensorRT 10/11 name-based tensor API (the one Polygraphy's ``TrtRunner`` uses with TensorRT > 8.5):
``set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3`` on CUDA buffers allocated by PyTorch, one
execution context and CUDA stream per worker thread (a context holds per-inference state and must not be shared
by concurrent callers; the engine is shared). ``tensorrt`` and ``torch`` are imported only when a runner is made.

An engine only runs on the TensorRT version and GPU architecture it was built with, unless it was built in one of
TensorRT's compatible modes: the ``<engine>.json`` sidecar written at build time is checked against this device first,
and a mismatch is a one-line error telling the user to rebuild the engine here. A version-compatible plan (its lean
runtime embedded) is left to TensorRT to accept on another release (it refuses older runtimes), with
``engine_host_code_allowed`` set for it; a hardware-compatible one ("ampere+") runs on any compute capability >= 8.0.
Everything (deserialising, contexts, buffers, execution) happens inside ``torch.cuda.device(device)``: TensorRT and
the CUDA allocations use the current device, so an engine for GPU 1 is never loaded onto GPU 0.
"""

from __future__ import annotations

import json
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from fine_infer.errors import BackendUnavailableError, BundleError, InputError
from fine_infer.runtime.base import Runner
from fine_infer.specs import GraphSpec

# TensorRT DataType member name → torch dtype name (resolved lazily; torch is not imported at module load).
_TORCH_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
                 "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}


def read_engine_meta(engine_path: str | Path) -> dict[str, Any]:
    """The build record saved beside an engine (``<engine>.json``)."""
    path = Path(f"{engine_path}.json")
    if not path.is_file():
        raise BundleError(f"{Path(engine_path).name} has no build record ({path.name}); "
                          "rebuild it with `fine-infer build-engine`")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise BundleError(f"{path} is damaged ({exc}); rebuild the engine with `fine-infer build-engine`") from None


def check_engine_compat(meta: dict[str, Any], tensorrt_version: str, gpu: str, compute_capability: str) -> None:
    """Raise :class:`BackendUnavailableError` when the engine was built for another TensorRT or GPU architecture.

    TensorRT engines are tied to the exact TensorRT version and the compute capability they were built for; a
    different GPU model of the same compute capability usually works, so that is only a warning."""
    name = meta.get("engine", "engine")
    built = (f"TensorRT {meta.get('tensorrt_version')} on {meta.get('gpu')} (compute capability "
             f"{meta.get('compute_capability')})")
    here = f"TensorRT {tensorrt_version} on {gpu} (compute capability {compute_capability})"
    # a version-compatible plan: TensorRT itself accepts it on a later release or refuses it (deserialisation)
    same_trt = meta.get("version_compatible") or str(meta.get("tensorrt_version")) == str(tensorrt_version)
    hardware = meta.get("hardware_compatibility", "none")
    if hardware == "ampere+":
        same_arch = float(compute_capability) >= 8.0
    else:
        same_arch = str(meta.get("compute_capability")) == str(compute_capability)
    if not same_trt or not same_arch:
        raise BackendUnavailableError(f"{name} was built with {built} but this device has {here}: "
                                      "rebuild it here with `fine-infer build-engine BUNDLE`")
    if meta.get("gpu") != gpu and hardware == "none":
        warnings.warn(f"{name} was built on {meta.get('gpu')} and runs on {gpu} (same compute capability); "
                      "rebuild it on this GPU for its best tactics", stacklevel=3)


class TensorRTRunner(Runner):
    """Runs one TensorRT engine. Inputs and outputs are numpy arrays; buffers live on the GPU as torch tensors."""

    backend = "tensorrt"

    def __init__(self, spec: GraphSpec, engine_path: str | Path, device: int = 0) -> None:
        super().__init__(spec)
        try:
            import tensorrt as trt
        except ImportError:
            raise BackendUnavailableError(
                "backend 'tensorrt' needs TensorRT, which is not installed here (JetPack ships it; elsewhere "
                "pip install --extra-index-url https://pypi.nvidia.com 'fine-infer[gpu-cu12]' (or gpu-cu13))"
            ) from None
        try:
            import torch
        except ImportError:
            raise BackendUnavailableError("backend 'tensorrt' needs PyTorch with CUDA for its GPU buffers") from None
        if not torch.cuda.is_available():
            raise BackendUnavailableError("backend 'tensorrt' needs a CUDA GPU; none is visible on this machine")
        self._trt, self._torch = trt, torch
        self._device = torch.device("cuda", device)
        major, minor = torch.cuda.get_device_capability(device)
        self._gpu = torch.cuda.get_device_name(device)
        self.meta = read_engine_meta(engine_path)
        check_engine_compat(self.meta, trt.__version__, self._gpu, f"{major}.{minor}")
        self._logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(self._device):  # TensorRT deserialises onto the current device
            self._runtime = trt.Runtime(self._logger)
            if self.meta.get("version_compatible"):
                # the plan carries its lean runtime (host code): allowed because the bundle's checksums (and its
                # signature, where there is one) were verified before anything was loaded
                self._runtime.engine_host_code_allowed = True
            self.engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            compat = (f" (a version-compatible plan built with TensorRT {self.meta.get('tensorrt_version')} runs on "
                      "that release and later ones only)" if self.meta.get("version_compatible") else "")
            raise BundleError(f"TensorRT {trt.__version__} could not deserialize {Path(engine_path).name}{compat}; "
                              "rebuild it with `fine-infer build-engine`")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        missing = [t.name for t in spec.inputs if t.name not in self._inputs]
        if missing:
            raise BundleError(f"engine {Path(engine_path).name} has no input(s) {missing}; it takes {self._inputs}")
        self._dtypes = {}
        for n in names:
            trt_type = self.engine.get_tensor_dtype(n).name
            if trt_type not in _TORCH_DTYPES:
                raise BundleError(f"engine tensor {n!r} is {trt_type}, which fine-infer cannot bind")
            self._dtypes[n] = getattr(torch, _TORCH_DTYPES[trt_type])
        self._local = threading.local()

    @property
    def provider(self) -> str:
        return f"tensorrt-{self._trt.__version__}-{self._gpu}"

    def _context(self):
        """This thread's execution context and CUDA stream (created on first use, on the engine's device: the caller
        is inside ``torch.cuda.device``)."""
        ctx = getattr(self._local, "ctx", None)
        if ctx is None:
            ctx = self.engine.create_execution_context()
            if ctx is None:
                raise BackendUnavailableError("TensorRT could not create an execution context (out of GPU memory?)")
            self._local.ctx = ctx
            self._local.stream = self._torch.cuda.Stream(device=self._device)
        return ctx, self._local.stream

    def _run_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        keep = []  # input tensors must outlive the asynchronous execution
        outputs: dict[str, Any] = {}
        with torch.cuda.device(self._device):
            ctx, stream = self._context()
        with torch.cuda.device(self._device), torch.cuda.stream(stream):
            for name in self._inputs:
                arr = feeds[name]
                lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
                if any(s < a or s > b for s, a, b in zip(arr.shape, lo, hi)):
                    raise InputError(f"input {name!r} has shape {arr.shape}; this engine was built for "
                                     f"{tuple(lo)} to {tuple(hi)} (rebuild with wider --batch/--sequence ranges)")
                t = torch.from_numpy(np.ascontiguousarray(arr))
                t = t.to(self._device, dtype=self._dtypes[name], non_blocking=True)
                keep.append(t)
                if not ctx.set_input_shape(name, tuple(t.shape)):
                    raise InputError(f"TensorRT rejected shape {tuple(t.shape)} for input {name!r}")
                ctx.set_tensor_address(name, t.data_ptr())
            for name in self._outputs:
                shape = tuple(ctx.get_tensor_shape(name))
                out = torch.empty(shape, dtype=self._dtypes[name], device=self._device)
                ctx.set_tensor_address(name, out.data_ptr())
                outputs[name] = out
            if not ctx.execute_async_v3(stream.cuda_stream):
                raise BackendUnavailableError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
        stream.synchronize()
        result = {}
        for name, t in outputs.items():
            if t.is_floating_point() and t.dtype != torch.float32:
                t = t.float()  # fp16 engines still hand back float32 arrays, like every other runner
            result[name] = t.cpu().numpy()
        return result

    def close(self) -> None:
        self._local = threading.local()
