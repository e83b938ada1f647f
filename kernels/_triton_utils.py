"""Shared pieces of the Triton kernels: launching with autotuning on a GPU and fixed blocks in the interpreter,
and small ``@triton.jit`` helpers. Imported only by the private kernel modules (never by ``fine_infer.kernels``)."""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Callable, Sequence

import torch
import triton
import triton.language as tl

from fine_infer.kernels._dispatch import interpreting

Grid = Callable[[dict[str, Any]], tuple[int, ...]]


def launch_device(args: Sequence[Any]):
    """``torch.cuda.device`` of the first CUDA tensor among ``args`` (a no-op context for CPU tensors).

    Triton launches on the *current* CUDA device and stream; a kernel given tensors on ``cuda:1`` while ``cuda:0`` is
    current would run on GPU 0 with pointers into GPU 1's memory. Entering the tensors' device makes them agree."""
    for a in args:
        if isinstance(a, torch.Tensor):
            if a.device.type == "cuda":
                return torch.cuda.device(a.device)
            break
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def _device_shared_memory(index: int) -> int:
    from triton.runtime import driver

    return int(driver.active.utils.get_device_properties(index)["max_shared_mem"])


def shared_memory_limit(device: torch.device) -> int | None:
    """Shared memory one program may use on ``device`` (bytes: the opt-in maximum per block, what Triton checks a
    compiled kernel against: 227 KB on an H100, 163 KB on an Orin, 99 KB on sm_86/sm_89); None off CUDA (the
    interpreter has no limit)."""
    if device.type != "cuda":
        return None
    return _device_shared_memory(device.index if device.index is not None else torch.cuda.current_device())


class Launcher:
    """One kernel, launched autotuned on a GPU and with fixed meta-parameters in the interpreter.

    ``configs`` are the GPU candidates (``triton.Config``), ``key`` the size arguments whose change re-tunes,
    ``interpret`` the block sizes used under ``TRITON_INTERPRET=1`` (timing numpy would tune nothing real).
    ``launch(grid, *args)`` runs it: ``grid(meta)`` maps the chosen meta-parameters to the launch grid.

    Thread safety (triton-lang/triton#11494): ``triton.autotune``'s ``Autotuner.run`` keeps per-call state on the
    autotuner object (``nargs``, set and cleared around every call, read while benchmarking), so two threads calling
    one kernel while it tunes can crash each other. Here a lock per kernel serialises every call that meets a tuning
    key not yet tuned (the first one tunes, the others then find the result), and calls of a tuned key never touch
    the autotuner: they launch the JIT function with the chosen config directly. The autotuner's results are cached
    on disk (``cache_results``, in ``TRITON_CACHE_DIR``), so a restarted process finds them without timing anything.
    """

    def __init__(self, fn: Callable, configs: Sequence[triton.Config], key: Sequence[str],
                 interpret: dict[str, Any], prune: Callable | None = None) -> None:
        # The mode is fixed when the kernel is defined: triton.jit returns an interpreter function under
        # TRITON_INTERPRET=1, and changing the variable later cannot turn one into the other.
        self.interpreted = interpreting()
        self.jit = triton.jit(fn)
        self.configs, self.key, self.interpret = list(configs), list(key), dict(interpret)
        self.prune = prune  # early_config_prune(configs, named_args, **fixed) -> configs, e.g. to fit shared memory
        self._tuned = None
        self._lock = threading.Lock()
        self._best: dict[tuple, triton.Config] = {}  # tuning key -> the config the autotuner chose

    @property
    def tuned(self):
        """The ``triton.autotune`` wrapper (built on first GPU use)."""
        if self._tuned is None:
            by = {"early_config_prune": self.prune} if self.prune else None
            # cache_results: the chosen config is kept in Triton's cache dir, so a restarted server skips tuning
            self._tuned = triton.autotune(configs=self.configs, key=self.key, prune_configs_by=by,
                                          cache_results=True)(self.jit)
        return self._tuned

    def tuning_key(self, args: Sequence[Any], fixed: dict[str, Any]) -> tuple:
        """The autotuner's key for a call (as ``Autotuner.run`` forms it): the values of the ``key`` arguments, then
        the dtype of every argument that has one."""
        named = {**dict(zip(self.jit.arg_names, args)), **fixed}
        named = {k: v for k, v in named.items() if k in self.jit.arg_names}
        return (*(named[k] for k in self.key if k in named),
                *(str(v.dtype) for v in named.values() if hasattr(v, "dtype")))

    def tuned_keys(self) -> list[tuple]:
        """The tuning keys this process has tuned (or found tuned on disk)."""
        return list(self._best)

    def launch(self, grid: Grid, *args: Any, **fixed: Any) -> None:
        """Launch over ``grid`` on the tensors' device; ``fixed`` are meta-parameters chosen by the wrapper (never
        tuned)."""
        with launch_device(args):
            if self.interpreted or not self.configs:  # nothing to tune: the fixed meta-parameters
                meta = {**(self.interpret if self.interpreted else {}), **fixed}
                self.jit[grid(meta)](*args, **meta)
                return
            key = self.tuning_key(args, fixed)
            best = self._best.get(key)
            if best is None:
                with self._lock:
                    best = self._best.get(key)
                    if best is None:  # this thread tunes (or reads the disk cache), then launches
                        self.tuned[lambda m: grid({**m, **fixed})](*args, **fixed)
                        self._best[key] = self.tuned.best_config
                        return
            meta = {**best.all_kwargs(), **fixed}
            self.jit[grid(meta)](*args, **meta)


def configs(space: Sequence[dict[str, Any]], warps: Sequence[int] = (4, 8), stages: Sequence[int] = (2, 3)):
    """``triton.Config`` for every block-size dict in ``space`` × ``num_warps`` × ``num_stages``."""
    return [triton.Config(dict(s), num_warps=w, num_stages=st) for s in space for w in warps for st in stages]


def next_pow2(n: int, minimum: int = 1) -> int:
    """The next power of two >= max(n, minimum) (Triton block shapes must be powers of two)."""
    return max(minimum, triton.next_power_of_2(max(int(n), 1)))


@triton.jit
def tanh(x):
    """fp32 tanh from ``exp`` (``libdevice.tanh`` does not run in the interpreter, and the tested code should be
    the shipped code). Small ``|x|`` uses the odd series, where ``1 - exp(-2|x|)`` would cancel."""
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    x2 = ax * ax
    # tanh x = x - x^3/3 + 2x^5/15 - 17x^7/315 + 62x^9/2835 - ...; the next term is < 1e-8 relative at |x| < 0.25
    small = ax * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333
                                                          + x2 * (-0.05396825396825397 + x2 * 0.021869488536155203))))
    t = tl.where(ax < 0.25, small, big)
    return tl.where(x < 0, -t, t)
