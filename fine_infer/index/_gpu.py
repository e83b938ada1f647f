"""Search on a CUDA device with torch: the gallery is cached on the device in its storage dtype and scored in chunks
(``fine_infer.kernels.similarity_topk``, the Triton kernel on CUDA tensors, or torch matmul + sort without it).

float16 rows are scored as they are stored (the kernel reads half the bytes and scores fp32 queries to fp32 precision:
no copy of the gallery per search); int8 rows are widened to float16 (exact for -128..127) and their scales folded
into the queries.

torch is imported only here and only when a CUDA device is asked for or plausibly present, so a CPU edge box with the
runtime extra (no torch) never pays for it.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

from fine_infer.errors import BackendUnavailableError

_CHUNK_BYTES = 256 << 20  # device memory per gallery chunk and per score block


def _driver_visible() -> bool:
    """A cheap probe before importing torch: NVIDIA device nodes (desktop / server GPUs and Jetson)."""
    if not sys.platform.startswith("linux"):
        return True  # no cheap probe elsewhere: let torch decide
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/nvhost-gpu", "/dev/nvgpu"))


def cuda_available() -> bool:
    """True when torch is importable and sees a CUDA device."""
    if "torch" not in sys.modules and not _driver_visible():
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def require_cuda(device: str) -> None:
    """Raise :class:`BackendUnavailableError` unless ``device`` can run."""
    try:
        import torch
    except ImportError:
        raise BackendUnavailableError(f"device {device!r} needs PyTorch with CUDA; torch is not installed "
                                      "(pip install 'fine-infer[gpu]' with a CUDA build of torch)") from None
    if not torch.cuda.is_available():
        raise BackendUnavailableError(f"device {device!r}: torch sees no CUDA device here; use device='cpu'")


class GpuGallery:
    """The gallery rows on a CUDA device (float32, float16 or int8 + scales), rebuilt when the index changes."""

    def __init__(self, device: str, rows: np.ndarray, scales: np.ndarray | None, version: int) -> None:
        import torch

        self.version = version
        self.device = torch.device(device)
        self.rows = torch.from_numpy(np.ascontiguousarray(rows)).to(self.device)
        self.scales = None if scales is None else torch.from_numpy(scales).to(self.device)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores float32, slots int64) as the CPU search returns them (ties to the lower slot)."""
        import torch

        n, dim = self.rows.shape
        nq = queries.shape[0]
        kk = min(k, n)
        q = torch.from_numpy(queries).to(self.device)
        if self.scales is not None:
            q = q * self.scales  # <q, s*x> = <q*s, x>: the int8 values are widened as they are
        chunk = max(1, min(_CHUNK_BYTES // (4 * dim), _CHUNK_BYTES // (4 * max(nq, 1))))
        parts_s, parts_i = [], []
        with torch.no_grad():
            for lo in range(0, n, chunk):
                g = self.rows[lo : lo + chunk]
                if g.dtype not in (torch.float16, torch.float32):
                    g = g.half()  # int8 values are exact in fp16
                s, i = _topk(q, g, min(kk, g.shape[0]))
                parts_s.append(s)
                parts_i.append(i + lo)
            s = torch.cat(parts_s, 1) if parts_s else torch.empty(nq, 0, device=self.device)
            i = torch.cat(parts_i, 1) if parts_i else torch.empty(nq, 0, dtype=torch.int64, device=self.device)
            # Chunks are in slot order and each is sorted with ties to the lower slot: a stable sort keeps that.
            order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :kk]
            s, i = torch.gather(s, 1, order), torch.gather(i, 1, order)
        out_s = np.full((nq, k), -np.inf, np.float32)
        out_i = np.full((nq, k), -1, np.int64)
        out_s[:, :kk] = s.cpu().numpy()
        out_i[:, :kk] = i.cpu().numpy()
        return out_s, out_i


def _topk(q: Any, g: Any, k: int) -> tuple[Any, Any]:
    """Best ``k`` of q @ g.T per row, ties to the lower index: the Triton kernel where available."""
    try:
        from fine_infer.kernels import similarity_topk
    except ImportError:  # kernels not installed: plain torch
        import torch

        scores = q.float() @ g.float().T
        order = torch.sort(scores, dim=1, descending=True, stable=True)
        return order.values[:, :k], order.indices[:, :k]
    return similarity_topk(q, g, k)
