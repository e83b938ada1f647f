"""Backend selection for the fused kernels: the Triton kernel or the PyTorch reference, call by call.

No Triton here: this module decides, the private kernel modules (``_maa_pool``, ``_attention``, ...) run. The rules,
in order:

1. While torch is tracing — ONNX export (``torch.onnx.is_in_onnx_export``), ``torch.jit`` tracing, Dynamo /
   ``torch.compile`` / ``torch.export`` (``torch.compiler.is_compiling``), a FakeTensor or meta input, or any
   active ``TorchDispatchMode`` — the reference runs, always: an exported graph is the reference's graph.
2. Backend ``"reference"``: the reference.
3. Backend ``"auto"`` (the default): the kernel when every tensor is on a CUDA device, Triton is installed, no
   autograd graph is being recorded and the kernel supports the problem; the reference otherwise. ``auto`` never
   opts into the (slow) Triton interpreter on CPU tensors.
4. Backend ``"triton"``: the kernel, on CUDA tensors or, with ``TRITON_INTERPRET=1``, in the interpreter on CPU
   tensors. Where the kernel cannot run, :class:`KernelUnavailableError` says why: a forced backend never falls
   back silently.

The backend is process-wide (:func:`set_backend`, or ``FINE_INFER_KERNELS=auto|triton|reference`` at import) and
can be overridden for a block of code in the current thread / task (:func:`use_backend`).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
import threading
from collections import Counter
from typing import Callable, Iterator, Optional, Sequence, Union

import torch

BACKENDS = ("auto", "triton", "reference")


class KernelUnavailableError(RuntimeError):
    """The ``triton`` backend was forced where a kernel cannot run (no Triton, CPU without the interpreter, ...)."""


def _check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; expected one of {BACKENDS}")
    return name


_global_backend: str = _check_backend(os.environ.get("FINE_INFER_KERNELS", "auto").strip().lower() or "auto")
_local_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("fine_infer_kernel_backend", default=None)

#: How often each (op, backend) ran; the benchmarks and tests read it to report what actually ran.
COUNTS: Counter = Counter()


def set_backend(name: str) -> str:
    """Set the process-wide backend (``"auto"``, ``"triton"`` or ``"reference"``); returns the previous one."""
    global _global_backend
    previous, _global_backend = _global_backend, _check_backend(name)
    return previous


def get_backend() -> str:
    """The backend in effect here: the innermost :func:`use_backend`, else the process-wide one."""
    return _local_backend.get() or _global_backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run a block with another backend (this thread / asyncio task only)."""
    token = _local_backend.set(_check_backend(name))
    try:
        yield
    finally:
        _local_backend.reset(token)


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` asks for the Triton interpreter (kernels run on CPU tensors, slowly)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no", "off")


def triton_installed() -> bool:
    """Whether ``triton`` can be imported, without importing it (importing it on a CPU-only box is not free)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a module entry without a spec, or an import blocked in sys.modules
        return False


def _is_fake(t: torch.Tensor) -> bool:
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover - very old torch
        return False
    return bool(is_fake(t))


def is_tracing(tensors: Sequence[torch.Tensor | None] = ()) -> bool:
    """True while torch records a graph rather than computing: export, jit tracing, Dynamo, fake or meta tensors."""
    # Dynamo first: it folds is_compiling() to True, so nothing below is traced (no graph break on fullgraph).
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return True
    if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    # make_fx / FakeTensorMode / functionalisation push a dispatch mode; real eager calls never have one.
    if torch._C._len_torch_dispatch_stack() > 0:
        return True
    for t in tensors:
        if t is None:
            continue
        if t.is_meta or _is_fake(t) or type(t) not in (torch.Tensor, torch.nn.Parameter):
            return True
    return False


Problem = Union[str, None, Callable[[], Optional[str]]]


def _why_not(tensors: Sequence[torch.Tensor], unsupported: Problem) -> str | None:
    """Why the kernel cannot run on these tensors (None: it can)."""
    if not triton_installed():
        return "Triton is not installed (pip install 'fine-infer[kernels]')"
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        return f"the tensors are on several devices ({', '.join(sorted(map(str, devices)))})"
    device = next(iter(devices))
    if device.type == "cpu" and not interpreting():
        return ("the tensors are on the CPU and TRITON_INTERPRET is not set (set TRITON_INTERPRET=1 before "
                "importing torch-using code to run the kernels in the Triton interpreter)")
    if device.type not in ("cpu", "cuda"):
        return f"the tensors are on {device.type}, which the kernels do not target"
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "an input requires grad and the kernels are inference-only (use torch.no_grad/inference_mode)"
    return unsupported() if callable(unsupported) else unsupported


def use_kernel(op: str, tensors: Sequence[torch.Tensor | None], unsupported: Problem = None) -> bool:
    """Decide whether ``op`` runs its Triton kernel on ``tensors`` (see the module docstring for the rules).

    ``unsupported`` is the op's own reason the kernel cannot take this problem (a size or dtype), or None; a
    callable is evaluated only when a kernel is considered (never while tracing: it may read shapes).
    Counts the choice in :data:`COUNTS` (calls made while tracing are not counted).
    """
    present = [t for t in tensors if t is not None]
    if is_tracing(present):  # not counted: a graph being recorded runs nothing
        return False
    backend = get_backend()
    if backend == "reference":
        choice = False
    else:
        reason = _why_not(present, unsupported)
        if backend == "triton":
            if reason is not None:
                raise KernelUnavailableError(f"{op}: the 'triton' backend is forced but {reason}")
            choice = True
        else:  # auto: CUDA only, never the interpreter
            choice = reason is None and present[0].device.type == "cuda"
    COUNTS[(op, "triton" if choice else "reference")] += 1
    return choice


# --- shapes seen, for warming the kernels up (fine_infer.kernels.record_shapes / warm_up) ---------------------------

_recorders: list[dict] = []  # every active record_shapes() collects here, from every thread
_recorders_lock = threading.Lock()


def recording_active() -> bool:
    """Whether a :func:`recording` is active (the entry points check this before building a shape to :func:`note`:
    a call pays nothing when nobody records)."""
    return bool(_recorders)


def note(op: str, tensors: Sequence[torch.Tensor | None], **shape: object) -> None:
    """Record a call of ``op`` with ``shape`` (sizes, dtypes, flags) in every active :func:`recording`; free when none
    is active. Calls made while torch traces are not recorded (they run nothing)."""
    if not _recorders or is_tracing([t for t in tensors if t is not None]):
        return
    key = (op, tuple(sorted(shape.items())))
    with _recorders_lock:
        for r in _recorders:
            r[key] = r.get(key, 0) + 1


@contextlib.contextmanager
def recording() -> Iterator[dict]:
    """Collect ``{(op, shape items): calls}`` of every kernel entry point called in any thread while active."""
    seen: dict = {}
    with _recorders_lock:
        _recorders.append(seen)
    try:
        yield seen
    finally:
        with _recorders_lock:
            _recorders.remove(seen)


# --- output allocation -------------------------------------------------------------------------------------------

_poison: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "fine_infer_kernel_poison", default=os.environ.get("FINE_INFER_KERNELS_POISON", "") == "1"
)


@contextlib.contextmanager
def poison_allocations(enabled: bool = True) -> Iterator[None]:
    """Fill every buffer the kernel wrappers allocate (outputs and workspaces) with NaN / an integer sentinel, so an
    element a kernel forgets to write shows up in a test instead of reading as stale memory."""
    token = _poison.set(enabled)
    try:
        yield
    finally:
        _poison.reset(token)


def poison_value(dtype: torch.dtype) -> float | int:
    """NaN for floating dtypes; the largest value for integers (an impossible index, a key that decodes to NaN)."""
    if dtype.is_floating_point:
        return float("nan")
    return torch.iinfo(dtype).max


def empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``torch.empty`` for kernel outputs and workspaces; poisoned inside :func:`poison_allocations`."""
    t = torch.empty(tuple(shape), dtype=dtype, device=device)
    if _poison.get():
        t.fill_(poison_value(dtype))
    return t


def check_out(out: torch.Tensor | None, shape: Sequence[int], dtype: torch.dtype, device: torch.device,
              name: str = "out") -> torch.Tensor:
    """Validate a caller's ``out=`` buffer, or allocate one."""
    if out is None:
        return empty(shape, dtype, device)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device:
        raise ValueError(f"{name} must be {tuple(shape)} {dtype} on {device}; got {tuple(out.shape)} {out.dtype} "
                         f"on {out.device}")
    return out


def into(out: torch.Tensor | None, result: torch.Tensor) -> torch.Tensor:
    """Return ``result``, copied into ``out`` when the caller gave one (the reference path's ``out=``)."""
    if out is None:
        return result
    check_out(out, result.shape, result.dtype, result.device)
    return out.copy_(result)
