"""PyTorch backend: rebuilds the bundle's zoo arch from its config and weights and runs the same graph.

Used for comparison (validate, bench) and, on CUDA, to run the fused Triton kernels. torch is imported here only.
"""

from __future__ import annotations

import numpy as np

from fine_infer.bundle import Bundle
from fine_infer.errors import BackendUnavailableError, BundleError, FineInferError, first_line
from fine_infer.runtime.base import Runner
from fine_infer.specs import GraphSpec


def _torch():
    try:
        import torch
    except ImportError as exc:
        raise BackendUnavailableError("the torch backend needs PyTorch: pip install 'fine-infer[export]'") from exc
    return torch


def model_from_bundle(bundle: Bundle):
    """The bundle's zoo model with its weights, in eval mode (user-module bundles cannot be rebuilt)."""
    _torch()
    from fine_infer.models import rebuild

    m = bundle.manifest
    if not m.arch or not m.weights:
        raise BackendUnavailableError(
            f"bundle {bundle.path} was exported from a user module ({m.source}); only zoo archs can run on the torch "
            "backend (use backend='onnxruntime')"
        )
    try:
        return rebuild(m.arch, m.config or {}, bundle.file(m.weights))
    except FineInferError:
        raise
    except (TypeError, ValueError, KeyError, OverflowError, MemoryError, RuntimeError) as exc:  # a config from elsewhere
        raise BundleError(f"bundle {bundle.path}: its config cannot build {m.arch!r} ({type(exc).__name__}: "
                          f"{first_line(exc, 200)}); re-export the bundle") from None


class TorchRunner(Runner):
    """Runs one graph of a zoo model in eager PyTorch on ``device``; ``kernels`` selects the fused Triton kernels."""

    backend = "torch"

    def __init__(self, spec: GraphSpec, model, device: str = "cpu", kernels: bool = False) -> None:
        super().__init__(spec)
        torch = _torch()
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailableError("device 'cuda' was asked for but torch sees no CUDA GPU")
        self.torch = torch
        self.device = torch.device(device)
        self.kernels = kernels
        self.module = model.graph_module(spec.name).to(self.device).eval()

    @property
    def provider(self) -> str:
        return f"torch-{self.device.type}" + ("+kernels" if self.kernels else "")

    def _run_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        args = [torch.from_numpy(feeds[t.name]).to(self.device) for t in self.spec.inputs]
        with torch.inference_mode(), _kernel_context(self.kernels):
            out = self.module(*args)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        if len(outs) != len(self.spec.outputs):
            raise BundleError(f"graph {self.spec.name!r} returned {len(outs)} outputs; spec has {len(self.spec.outputs)}")
        return {t.name: o.detach().float().cpu().numpy() for t, o in zip(self.spec.outputs, outs)}


def _kernel_context(enabled: bool):
    import contextlib

    if not enabled:
        return contextlib.nullcontext()
    from fine_infer import kernels

    return kernels.use_backend("triton")
