"""How the kernels are launched, checked on the CPU: grid limits of bulk batches, the device the launch runs on,
one tuning at a time per kernel, and the norm + FFN configs pruned to a device's shared memory.

- Grids: CUDA takes 2³¹-1 programs on ``x`` but 65535 on ``y`` and ``z``; every wrapper is called with a bulk batch
  (batch × heads above 65535) and the grid of every config checked, launches recorded instead of run.
- Device: Triton launches on the current CUDA device, so every launch enters the tensors' device.
- Tuning (triton-lang/triton#11494): concurrent first calls of one kernel must not run the autotuner at once; a stand-in
  autotuner that fails when two calls overlap, as Triton's shares ``nargs`` between them.
- Shared memory: the configs kept for an Orin (163 KB) and an H100 (227 KB).
"""

from __future__ import annotations

import threading
import time
import types

import pytest
import torch

from fine_infer import kernels

pytest.importorskip("triton")

from fine_infer.kernels import FusionBlockWeights, _attention, _fusion_block, _maa_pool, _topk  # noqa: E402
from fine_infer.kernels import _triton_utils  # noqa: E402

LAUNCHERS = {"tile": _maa_pool._tile, "merge": _maa_pool._merge, "mix": _maa_pool._mix, "attention": _attention._fwd,
             "scan": _topk._scan, "scan_wide": _topk._scan_wide, "norm": _fusion_block._norm, "ffn": _fusion_block._ffn}
X_MAX, YZ_MAX = 2**31 - 1, 65535
ORIN, H100, SM86 = 163 * 1024, 227 * 1024, 99 * 1024


@pytest.fixture
def recorded(monkeypatch):
    """Launches recorded (launcher, grid, fixed meta) instead of run."""
    calls = []

    def record(self, grid, *args, **fixed):
        calls.append((self, grid, fixed))

    monkeypatch.setattr(_triton_utils.Launcher, "launch", record)
    return calls


def _grids(launcher, grid, fixed):
    metas = [{**c.all_kwargs(), **fixed} for c in launcher.configs] or [dict(fixed)]
    metas.append({**launcher.interpret, **fixed})
    return [grid(m) for m in metas]


def test_bulk_batches_fit_the_grid_limits(recorded, interpreter):
    """batch × heads = 70,000 > 65,535: the attention grid is one-dimensional; every other grid keeps the batch (or
    queries) on x."""
    B, H = 8750, 8
    q = torch.randn(B, H, 2, 16)
    x = torch.randn(70_000, 3, 16)
    sizes = [(16,), (16,)] + [(16, 16), (16,)] * 4 + [(16,), (16,), (32, 16), (32,), (16, 32), (16,)]
    w = FusionBlockWeights(*(torch.randn(*s) for s in sizes))
    with kernels.use_backend("triton"), torch.no_grad():
        kernels.attention_fusion(q, q, q, torch.ones(B, 2, dtype=torch.bool))
        kernels.fusion_block(torch.randn(70_000, 1, 16), None, w, num_heads=1)
        kernels.patch_pool_adapter(x, None, torch.randn(16, 16), torch.randn(16), torch.randn(16), torch.randn(8, 16),
                                   torch.randn(8), torch.randn(8, 8), torch.randn(8), 0.5)
        kernels.similarity_topk(torch.randn(70_000, 16), torch.randn(300, 16), 5)
        kernels.similarity_topk(torch.randn(70_000, 16), torch.randn(3000, 16), 1000)
    seen = {name for name, lau in LAUNCHERS.items() for launcher, _, _ in recorded if launcher is lau}
    assert seen == set(LAUNCHERS), seen
    for launcher, grid, fixed in recorded:
        for g in _grids(launcher, grid, fixed):
            assert 1 <= g[0] <= X_MAX and all(1 <= v <= YZ_MAX for v in g[1:]), (launcher.jit.fn.__name__, g)
    att = [g for lau, grid, fixed in recorded if lau is _attention._fwd for g in _grids(lau, grid, fixed)]
    assert all(len(g) == 1 for g in att) and max(g[0] for g in att) >= B * H


def test_the_flattened_attention_grid_still_matches_the_reference(interpreter):
    """Several query blocks per head and several heads (the program → (block, head) mapping), in the interpreter."""
    from fine_infer.kernels import reference

    q, k, v = (torch.randn(3, 2, 70, 16) for _ in range(3))
    mask = torch.rand(3, 70) < 0.8
    with kernels.use_backend("triton"), torch.no_grad():
        got = kernels.attention_fusion(q, k, v, mask)
    want = reference.attention_fusion(q.double(), k.double(), v.double(), mask)
    assert (got.double() - want).abs().max() < 1e-5


def test_launches_run_on_the_tensors_device():
    cuda1 = types.SimpleNamespace(device=torch.device("cuda", 1))
    ctx = _triton_utils.launch_device([3, torch.empty(0, device="meta"), cuda1])  # the first tensor decides: meta
    assert not isinstance(ctx, torch.cuda.device)

    class FakeCuda(torch.Tensor):  # a tensor that says it lives on cuda:1 (no CUDA needed to build the context)
        @property
        def device(self):
            return torch.device("cuda", 1)

    t = torch.empty(0).as_subclass(FakeCuda)
    ctx = _triton_utils.launch_device([7, t])
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 1
    assert not isinstance(_triton_utils.launch_device([torch.empty(1)]), torch.cuda.device)  # CPU: nothing to enter


class RacyAutotuner:
    """Triton's Autotuner keeps ``nargs`` on itself during a call; overlapping calls see each other's (issue 11494)."""

    def __init__(self, delay=0.05):
        self.nargs, self.cache, self.best_config, self.delay = None, {}, None, delay
        self.tunings, self.runs, self.overlaps = [], 0, 0

    def __getitem__(self, grid):
        def run(*args, **fixed):
            if self.nargs is not None:
                self.overlaps += 1
                raise TypeError("'NoneType' object is not a mapping")  # what a clobbered nargs looks like
            self.nargs = args
            time.sleep(self.delay)
            key = (args[1], str(args[0].dtype))
            if key not in self.cache:
                self.tunings.append(key)
                chosen = {"BLOCK": 16 * (len(self.cache) + 1)}
                self.cache[key] = types.SimpleNamespace(all_kwargs=lambda chosen=chosen: dict(chosen))
            self.best_config = self.cache[key]
            self.runs += 1
            self.nargs = None
        return run


def _probe_kernel(x_ptr, N, BLOCK):
    pass


def test_first_calls_from_many_threads_tune_once_per_key():
    launcher = _triton_utils.Launcher(_probe_kernel, [object(), object()], key=["N"], interpret={})
    launcher.interpreted = False  # as on a GPU: tuned launches
    launcher._tuned = RacyAutotuner()
    direct = []

    class Jit:
        arg_names = ["x_ptr", "N", "BLOCK"]

        def __getitem__(self, grid):
            return lambda *args, **meta: direct.append((grid, args[1], meta["BLOCK"]))

    launcher.jit = Jit()
    x = torch.empty(4)
    errors = []

    def call(n):
        try:
            launcher.launch(lambda m: (n, m["BLOCK"]), x, n)
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(n,)) for n in (10, 10, 10, 20, 20, 10, 20, 10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tuner = launcher._tuned
    assert not errors and tuner.overlaps == 0
    assert sorted(tuner.tunings) == [(10, "torch.float32"), (20, "torch.float32")]  # one tuning per key
    assert tuner.runs + len(direct) == 8  # the others launched the chosen config directly
    assert all(block == tuner.cache[(n, "torch.float32")].all_kwargs()["BLOCK"] for _, n, block in direct)
    assert set(launcher.tuned_keys()) == {(10, "torch.float32"), (20, "torch.float32")}
    before = tuner.runs
    launcher.launch(lambda m: (1,), x, 10)  # a tuned key never reaches the autotuner again
    assert tuner.runs == before


def test_the_tuning_key_is_the_autotuners():
    """Launcher.tuning_key forms the key as triton's Autotuner.run does (key arguments, then every dtype)."""
    q = torch.randn(2, 8, dtype=torch.float16)
    key = _topk._scan.tuning_key((q, q.float(), q, 2, 3, 8, 1, 1, 1, 1, 1, 1, 1, 1), {"BLOCK_N": 128, "USE_DOT": True})
    assert key == (8, 128, "torch.float16", "torch.float32", "torch.float16")


@pytest.mark.parametrize("limit,dtype,ff,want", [
    (ORIN, torch.float32, 1024, [(16, 16)]),  # only the small fallback fits 163 KB (16 × 32 needs 194 KB)
    (H100, torch.float32, 1024, [(16, 32)]),
    (ORIN, torch.float16, 1024, [(16, 32), (16, 64), (32, 32)]),
    (ORIN, torch.float16, 256, [(m, d) for m in (16, 32, 64) for d in (32, 64)]),  # the paper widths: every block
    (SM86, torch.float32, 1024, []),  # 99 KB: nothing fits; the dispatcher runs the reference
    (SM86, torch.float32, 256, [(16, 32), (16, 64), (32, 32)]),
])
def test_norm_ffn_configs_are_pruned_to_the_shared_memory(limit, dtype, ff, want):
    size = torch.empty((), dtype=dtype).element_size()
    kept = _fusion_block.fit_ffn_configs(_fusion_block._ffn.configs, limit, max(16, 1 << (ff - 1).bit_length()), size)
    assert sorted({(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_D"]) for c in kept}) == want
    assert all(_fusion_block.ffn_shared_bytes(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_D"], ff, size) <= limit
               for c in kept)


def test_a_width_no_config_fits_falls_back_to_the_reference(monkeypatch):
    """On a GPU whose shared memory no config fits, auto runs the reference and a forced kernel says why."""
    monkeypatch.setattr(_fusion_block, "shared_memory_limit", lambda device: SM86)
    why = _fusion_block.ffn_unsupported(1024, torch.float32, torch.device("cuda", 0))
    assert why == "FFN width 1024 in float32 needs 129 KB of shared memory per program; cuda:0 has 99 KB"
    assert _fusion_block.ffn_unsupported(1024, torch.float16, torch.device("cuda", 0)) is None
    monkeypatch.setattr(_fusion_block, "shared_memory_limit", lambda device: None)  # the interpreter: no limit
    assert _fusion_block.ffn_unsupported(1024, torch.float32, torch.device("cpu")) is None


# --- on a CUDA device ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_a_bulk_attention_batch_launches_on_cuda():
    """batch × heads = 65,600 > 65,535 (the grid-y limit the kernel used to hit)."""
    from fine_infer.kernels import reference

    q, k, v = (torch.randn(8200, 8, 16, 32, device="cuda", dtype=torch.float16) for _ in range(3))
    mask = torch.rand(8200, 16, device="cuda") < 0.9
    with kernels.use_backend("triton"), torch.no_grad():
        got = kernels.attention_fusion(q, k, v, mask)
    want = reference.attention_fusion(q.float(), k.float(), v.float(), mask)
    assert (got.float() - want).abs().max().item() < 5e-3


@pytest.mark.gpu
def test_kernels_run_on_the_tensors_gpu_not_the_current_one():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    from fine_infer.kernels import reference

    x = torch.randn(4, 64, 128, device="cuda:1")
    w1, b1, w2 = (torch.randn(128, 128, device="cuda:1") / 128**0.5, torch.randn(128, device="cuda:1"),
                  torch.randn(128, device="cuda:1"))
    torch.cuda.set_device(0)
    with kernels.use_backend("triton"), torch.no_grad():
        got = kernels.maa_pool(x, w1, b1, w2)
    assert got.device == torch.device("cuda", 1) and torch.cuda.current_device() == 0
    want = reference.maa_pool(x.double(), w1.double(), b1.double(), w2.double())
    assert (got.double() - want).abs().max().item() < 1e-4


@pytest.mark.gpu
def test_concurrent_first_calls_on_cuda_do_not_crash():
    """Eight threads meet an untuned key of the search kernel at once (triton-lang/triton#11494)."""
    g = torch.randn(20_000, 72, device="cuda", dtype=torch.float16)  # D = 72: a tuning key no other test uses
    qs = [torch.randn(16, 72, device="cuda") for _ in range(8)]
    results, errors = [None] * 8, []

    def call(i):
        try:
            with kernels.use_backend("triton"), torch.no_grad():
                results[i] = kernels.similarity_topk(qs[i], g, 10)
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for q, (s, _) in zip(qs, results):
        want = torch.topk(q.double() @ g.double().T, 10).values
        assert (s.double() - want).abs().max().item() < 1e-4


@pytest.mark.gpu
def test_fp32_queries_over_an_fp16_gallery_on_cuda_give_the_fp32_indices():
    g = torch.nn.functional.normalize(torch.randn(200_000, 256, device="cuda"), dim=1).half()
    q = torch.nn.functional.normalize(torch.randn(64, 256, device="cuda"), dim=1)
    with kernels.use_backend("triton"), torch.no_grad():
        _, idx = kernels.similarity_topk(q, g, 10)
    exact = q.double() @ g.double().T
    ref = torch.topk(exact, 10)
    # every returned row really is a top-10 row (to fp32 rounding), and nearly every index is the reference's
    assert (exact.gather(1, idx) - ref.values).abs().max().item() < 1e-5
    assert (idx == ref.indices).float().mean().item() >= 0.999
