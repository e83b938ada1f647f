"""Warming the kernels up before a server says it is ready, and keeping what that costs across restarts.

A kernel's first call with a new *tuning key* (its sizes bucketed: hidden size and tokens per tile for pooling, head
dim and the power-of-two bucket of L for attention, width and FFN size for the block, dim and the power-of-two bucket
of k for search, and the dtypes) autotunes: every candidate config is compiled and timed (4-13 per kernel). Every new
*specialisation* (an integer argument that is 1 or a multiple of 16, a new constexpr) compiles once more. Compiling
took 35-216 s per config ahead of time on a 2-core CPU, so a cold first request can take minutes.

:func:`record_shapes` collects the shapes the kernel entry points see during a probe through the real call path (any
backend, any thread: a few requests of each kind the server takes); :func:`warm_up` then runs every recorded call
on the GPU at every batch size the server can form (and every k bucket of search up to ``max_k``), so every tuning
key and specialisation is compiled and tuned before the first real request. Both results persist in Triton's cache
directory — compiled kernels and the autotuner's choices (``cache_results``) — which :func:`configure_cache` points
at a folder the deployment keeps (``TRITON_CACHE_DIR``): a restarted server finds everything there and warms up in
seconds (loading cubins and reading the tuning choices; no timing).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from fine_infer import kernels
from fine_infer.kernels import _dispatch

BATCHED = {"maa_pool": "B", "patch_pool_adapter": "B", "attention_fusion": "B", "fusion_block": "B",
           "similarity_topk": "Q"}
TOPK_WIDTHS = (128, 256, 512, 1024)  # the k buckets of the search kernel (its tuning key's BLOCK_N)
MAX_GALLERY_ROWS = 1 << 18  # a warm-up gallery needs the dims and dtypes of the real one, not its size


class ShapeLog:
    """The kernel calls seen by :func:`record_shapes`: ``calls`` is a list of ``(op, shape dict)``, one per distinct
    call (``counts`` how often each was seen). Filled while the ``with`` block runs, from every thread."""

    def __init__(self, seen: dict) -> None:
        self._seen = seen

    @property
    def calls(self) -> list[tuple[str, dict[str, Any]]]:
        return [(op, dict(items)) for op, items in self._seen]

    @property
    def counts(self) -> dict[tuple, int]:
        return dict(self._seen)

    def __len__(self) -> int:
        return len(self._seen)

    def __repr__(self) -> str:
        return f"ShapeLog({len(self)} distinct kernel calls: {sorted({op for op, _ in self._seen})})"


class record_shapes:  # noqa: N801 - used as a context manager, like torch.no_grad
    """``with kernels.record_shapes() as log:`` collects every kernel entry point's call shapes into ``log`` (a
    :class:`ShapeLog`), whichever backend runs them (the reference path records too, so the probe can be cheap)."""

    def __enter__(self) -> ShapeLog:
        self._cm = _dispatch.recording()
        return ShapeLog(self._cm.__enter__())

    def __exit__(self, *exc) -> None:
        self._cm.__exit__(*exc)


def configure_cache(path: str | os.PathLike | None = None) -> str:
    """Point Triton's cache (compiled kernels and autotuning results) at ``path`` (created) and return the folder in
    use; without ``path``, return the one in use (``TRITON_CACHE_DIR``, else ``~/.triton/cache``). Triton reads the
    variable whenever it compiles or tunes, so call this before the first kernel runs (the deployment may as well
    set ``TRITON_CACHE_DIR`` itself). Keep the folder across restarts (a volume): it is what makes them fast."""
    if path is not None:
        Path(path).mkdir(parents=True, exist_ok=True)
        os.environ["TRITON_CACHE_DIR"] = os.fspath(Path(path).resolve())
    if os.environ.get("TRITON_CACHE_DIR"):
        return os.environ["TRITON_CACHE_DIR"]
    home = os.environ.get("TRITON_HOME", os.path.expanduser("~"))
    return os.path.join(home, ".triton", "cache")


def _sizes(shape: dict, op: str, batch_sizes: Iterable[int] | None) -> list[int]:
    recorded = int(shape[BATCHED[op]])
    return sorted({int(b) for b in batch_sizes}) if batch_sizes is not None else [recorded]


def _expand(calls: list[tuple[str, dict]], batch_sizes: Iterable[int] | None, max_k: int | None
            ) -> Iterator[tuple[str, dict]]:
    """Every (op, shape) to run: each recorded call at each batch size, search at each k bucket up to ``max_k``."""
    done = set()
    for op, shape in calls:
        variants = [shape]
        if op == "similarity_topk" and max_k:
            ks = {min(w, int(max_k)) for w in TOPK_WIDTHS if w // 2 < max_k}  # one k per width bucket up to max_k
            variants = [{**shape, "k": k} for k in sorted(ks | {int(shape["k"])})]
        for v in variants:
            for b in _sizes(v, op, batch_sizes):
                s = {**v, BATCHED[op]: b}
                key = (op, tuple(sorted(s.items())))
                if key not in done:
                    done.add(key)
                    yield op, s


def _randn(shape, dtype, device, scale=1.0):
    return (torch.randn(*shape, device=device) * scale).to(getattr(torch, dtype))


def _run(op: str, s: dict, device: torch.device) -> None:
    """One call of ``op`` on synthetic inputs of shape ``s`` (values are irrelevant: only shapes, dtypes and strides
    decide what compiles and tunes)."""
    dt = s.get("dtype", "float32")
    if op in ("maa_pool", "patch_pool_adapter"):
        B, N, H = s["B"], s["N"], s["H"]
        x = _randn((B, N, H), dt, device)
        mask = torch.ones(B, N, dtype=torch.bool, device=device) if s["mask"] else None
        w1, b1, w2 = _randn((H, H), dt, device, H ** -0.5), _randn((H,), dt, device), _randn((H,), dt, device)
        if op == "maa_pool":
            kernels.maa_pool(x, w1, b1, w2, mask)
        else:
            P, E = s["P"], s["E"]
            kernels.patch_pool_adapter(x, mask, w1, b1, w2, _randn((P, H), dt, device), _randn((P,), dt, device),
                                       _randn((E, P), dt, device), _randn((E,), dt, device), 0.5, s["pool_start"])
    elif op == "attention_fusion":
        B, h, L, d = s["B"], s["heads"], s["L"], s["d"]
        strides = s.get("strides") or (h * L * d, L * d, d, 1)
        stride = (max(strides[0], 1), *strides[1:])
        size = 1 + sum((n - 1) * st for n, st in zip((B, h, L, d), stride))  # the models' strided (transposed) views
        q, k, v = (_randn((size,), dt, device).as_strided((B, h, L, d), stride) for _ in range(3))
        mask = torch.ones(B, L, dtype=torch.bool, device=device) if s["mask"] else None
        kernels.attention_fusion(q, k, v, mask)
    elif op == "fusion_block":
        B, L, D, FF = s["B"], s["L"], s["D"], s["FF"]
        shapes = [(D,), (D,)] + [(D, D), (D,)] * 4 + [(D,), (D,), (FF, D), (FF,), (D, FF), (D,)]
        w = kernels.FusionBlockWeights(*(_randn(sh, dt, device, 0.1) for sh in shapes))
        mask = torch.ones(B, L, dtype=torch.bool, device=device) if s["mask"] else None
        kernels.fusion_block(_randn((B, L, D), dt, device), mask, w, s["heads"], s["norm"])
    elif op == "similarity_topk":
        n = s["N"] if s["N"] <= MAX_GALLERY_ROWS else MAX_GALLERY_ROWS + s["N"] % 16  # same divisibility by 16
        kernels.similarity_topk(_randn((s["Q"], s["D"]), dt, device), _randn((n, s["D"]), s["gallery_dtype"], device),
                                 min(s["k"], 1024))
    else:  # pragma: no cover - an entry point added without its warm-up
        raise ValueError(f"no warm-up for kernel entry point {op!r}")


def warm_up(
    shapes: ShapeLog | Iterable[tuple[str, dict]],
    *,
    batch_sizes: Iterable[int] | None = None,
    max_k: int | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Compile and tune every kernel call of ``shapes`` on ``device`` (default: the current CUDA device), at every
    batch size in ``batch_sizes`` (default: the recorded ones) and, for search, every k bucket up to ``max_k``.

    Returns a report: ``calls`` (op, shape, seconds each; ``skipped`` with the reason for a call the kernel does not
    take, which the ``auto`` backend serves with the reference), ``seconds`` in all, ``tuned`` (tuning keys per
    kernel), ``cache_dir``. Without a CUDA device (and outside the interpreter) nothing can compile: the report says so in
    ``skipped`` and nothing runs — serve may call this unconditionally."""
    calls = shapes.calls if isinstance(shapes, ShapeLog) else [(op, dict(s)) for op, s in shapes]
    report: dict[str, Any] = {"cache_dir": configure_cache(), "calls": [], "seconds": 0.0, "tuned": {}}
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cpu" and not _dispatch.interpreting():
        report["skipped"] = "no CUDA device: nothing to compile (the kernels run on CUDA tensors only)"
        return report
    t_all = time.perf_counter()
    with torch.inference_mode(), kernels.use_backend("triton"):
        for op, s in _expand(calls, batch_sizes, max_k):
            t = time.perf_counter()
            try:
                _run(op, s, device)
            except kernels.KernelUnavailableError as exc:  # served by the reference (backend auto): nothing to warm
                report["calls"].append({"op": op, "shape": s, "seconds": 0.0, "skipped": str(exc)})
                continue
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            report["calls"].append({"op": op, "shape": s, "seconds": round(time.perf_counter() - t, 4)})
    report["seconds"] = round(time.perf_counter() - t_all, 3)
    report["tuned"] = _tuned_keys()
    return report


def _tuned_keys() -> dict[str, int]:
    """Tuning keys per kernel that this process has tuned or found on disk (only the kernel modules already
    imported are asked: warming up never imports Triton for nothing)."""
    import sys

    launcher_cls = getattr(sys.modules.get("fine_infer.kernels._triton_utils"), "Launcher", None)
    out = {}
    for name in ("_maa_pool", "_attention", "_fusion_block", "_topk"):
        module = sys.modules.get(f"fine_infer.kernels.{name}")
        for attr, value in vars(module).items() if module and launcher_cls else ():
            if isinstance(value, launcher_cls) and value.configs:
                out[f"{name[1:]}.{attr.lstrip('_')}"] = len(value.tuned_keys())
    return out
