"""Shared pieces of the Triton kernels: launching with autotuning on a GPU and fixed blocks in the interpreter,
and small ``@triton.jit`` helpers. Imported only by the private kernel modules (never by ``fine_infer.kernels``)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import triton
import triton.language as tl

from fine_infer.kernels._dispatch import interpreting

Grid = Callable[[dict[str, Any]], tuple[int, ...]]


class Launcher:
    """One kernel, launched autotuned on a GPU and with fixed meta-parameters in the interpreter.

    ``configs`` are the GPU candidates (``triton.Config``), ``key`` the size arguments whose change re-tunes,
    ``interpret`` the block sizes used under ``TRITON_INTERPRET=1`` (timing numpy would tune nothing real).
    ``launch(grid, *args)`` runs it: ``grid(meta)`` maps the chosen meta-parameters to the launch grid.
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

    @property
    def tuned(self):
        """The ``triton.autotune`` wrapper (built on first GPU use)."""
        if self._tuned is None:
            by = {"early_config_prune": self.prune} if self.prune else None
            # cache_results: the chosen config is kept in Triton's cache dir, so a restarted server skips tuning
            self._tuned = triton.autotune(configs=self.configs, key=self.key, prune_configs_by=by,
                                          cache_results=True)(self.jit)
        return self._tuned

    def launch(self, grid: Grid, *args: Any, **fixed: Any) -> None:
        """Launch over ``grid``; ``fixed`` are meta-parameters chosen by the wrapper (never tuned)."""
        if self.interpreted or not self.configs:  # nothing to tune: the fixed meta-parameters
            meta = {**(self.interpret if self.interpreted else {}), **fixed}
            self.jit[grid(meta)](*args, **meta)
        else:
            self.tuned[lambda m: grid({**m, **fixed})](*args, **fixed)


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
