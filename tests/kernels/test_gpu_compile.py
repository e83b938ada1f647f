"""The GPU side of the kernels, as far as a machine without a GPU can check it.

- ``test_kernels_compile_for_nvidia_targets``: every kernel is compiled ahead of time to a cubin for sm_90
  (H100-class) and sm_87 (Jetson Orin) by Triton's own LLVM and ``ptxas`` — type errors, illegal shapes, layouts
  and shared-memory overflows that the interpreter never sees fail here. This file is also the script that does it
  (``python tests/kernels/test_gpu_compile.py [cc ...]`` prints registers, spills and shared memory per kernel),
  run in a subprocess without ``TRITON_INTERPRET``.
- ``gpu``-marked tests run the kernels on a CUDA device against the float64 reference at the paper's sizes;
  they skip with a reason here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

SHARED_LIMIT = {90: 227 * 1024, 87: 163 * 1024}  # usable shared memory per block: H100, Orin


def _sources():
    """Import the kernel modules for real compilation (only in the script process, never under pytest)."""
    import triton  # noqa: F401
    from triton.compiler import ASTSource

    from fine_infer.kernels import _attention, _fusion_block, _maa_pool, _topk

    return ASTSource, _attention, _fusion_block, _maa_pool, _topk


def _sig(fn, types: dict[str, str], constexprs: dict[str, object]):
    """Signature from the kernel's argument order: pointers named ``*_ptr`` get ``types[name]`` (default fp16),
    ``stride_*`` and sizes i32, ``qk_scale``/``eps``/``r`` fp32, constexprs from ``constexprs``."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in types:
            sig[name] = types[name]
        elif name.endswith("_ptr"):
            sig[name] = "*fp16"
        elif name in ("qk_scale", "eps", "r"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    ASTSource = _sources()[0]
    return ASTSource(fn=fn, signature=sig, constexprs=constexprs)


def _ffn_case(cc: int, dtype: str, ff: int):
    """The norm + FFN config the pruning keeps for ``cc``'s real shared-memory limit whose program is the largest
    (the one closest to the limit), at FFN width ``ff``: (name, ASTSource, num_warps, estimated shared bytes,
    num_stages)."""
    _, _, _fusion_block, _, _ = _sources()
    size = 4 if dtype == "fp32" else 2
    kept = _fusion_block.fit_ffn_configs(_fusion_block._ffn.configs, SHARED_LIMIT[cc], ff, size)
    assert kept, f"no norm + FFN config fits sm_{cc} at FF={ff} {dtype}"

    def estimate(c):
        return _fusion_block.ffn_shared_bytes(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_D"], ff, size)

    c = max(kept, key=lambda c: (estimate(c), -c.num_warps))
    ptrs = {n: f"*{dtype}" for n in _fusion_block._ffn.jit.arg_names if n.endswith("_ptr")}
    src = _sig(_fusion_block._ffn.jit, ptrs, {"ANNOTATED": True, **c.kwargs, "BLOCK_F": ff})
    return f"norm_ffn_{dtype}_ff{ff}", src, c.num_warps, estimate(c), c.num_stages


def cases(cc: int):
    """(name, ASTSource, num_warps[, estimated shared bytes, num_stages]) for every kernel, at block sizes the
    autotuner may pick for the paper's shapes; for norm + FFN also the widest FFN (1024) at the largest config kept for ``cc``'s
    shared-memory limit (fp32 on both targets, fp16 too on the Orin, where the fp16 16 × 64 block is within 1 KB of
    163 KB)."""
    _, _attention, _fusion_block, _maa_pool, _topk = _sources()
    f32 = "*fp32"
    yield "maa_pool_tile", _sig(_maa_pool._tile.jit, {"b1_ptr": f32, "w2_ptr": f32, "mask_ptr": "*u8",
                                                       "acc_ptr": f32, "stats_ptr": f32},
                                {"HAS_MASK": True, "BLOCK_N": 64, "BLOCK_J": 64, "BLOCK_K": 64, "BLOCK_H": 128}), 8
    yield "maa_pool_merge", _sig(_maa_pool._merge.jit, {"acc_ptr": f32, "stats_ptr": f32},
                                 {"BLOCK_T": 16, "BLOCK_H": 128}), 4
    yield "mix_normalize", _sig(_maa_pool._mix.jit, {}, {"BLOCK_E": 256}), 4
    for name, dtype, bm in (("attention_fp16", "*fp16", 64), ("attention_fp32", "*fp32", 32)):
        yield name, _sig(_attention._fwd.jit, {"q_ptr": dtype, "k_ptr": dtype, "v_ptr": dtype, "o_ptr": dtype,
                                                "mask_ptr": "*u8"},
                         {"HAS_MASK": True, "L_BUCKET": 512, "BLOCK_M": bm, "BLOCK_N": 32, "BLOCK_D": 64}), 4
    yield "topk_k10", _sig(_topk._scan.jit, {"q_ptr": "*fp32", "keys_ptr": "*i64"},
                           {"USE_DOT": True, "SPLIT_Q": True, "BLOCK_Q": 16, "BLOCK_N": 128, "BLOCK_D": 64}), 4
    yield "topk_k1024", _sig(_topk._scan_wide.jit, {"q_ptr": "*fp32", "keys_ptr": "*i64"},
                             {"USE_DOT": False, "SPLIT_Q": False, "BLOCK_Q": 2, "BLOCK_N": 1024, "BLOCK_D": 8}), 8
    yield "block_norm", _sig(_fusion_block._norm.jit, {}, {"ANNOTATED": True, "BLOCK_M": 8, "BLOCK_D": 128}), 4
    yield "norm_ffn", _sig(_fusion_block._ffn.jit, {"xb_ptr": "*fp16"},
                           {"ANNOTATED": True, "BLOCK_M": 32, "BLOCK_D": 64, "BLOCK_F": 256}), 8, \
        _fusion_block.ffn_shared_bytes(32, 64, 256, 2), 2
    yield _ffn_case(cc, "fp32", 1024)
    if cc == 87:
        yield _ffn_case(cc, "fp16", 1024)


def _ptxas_stats(ptx: str, arch: str) -> dict:
    """Registers and spill bytes from ``ptxas -v`` (the cubin's metadata needs a driver to read them)."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    path = f"/tmp/_aot_{os.getpid()}.ptx"
    with open(path, "w") as f:
        f.write(ptx)
    try:
        res = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", path, "-o", "/dev/null"], capture_output=True,
                             text=True, check=True)
    finally:
        os.unlink(path)
    regs = re.search(r"Used (\d+) registers", res.stderr)
    spill = re.search(r"(\d+) bytes spill stores", res.stderr)
    return {"registers": int(regs.group(1)) if regs else None, "spill_bytes": int(spill.group(1)) if spill else 0}


def _check_launchers() -> list:
    """Every GPU launcher builds its ``triton.autotune`` wrapper, and the config pruning keeps >= 1 config."""
    _, _attention, _fusion_block, _maa_pool, _topk = _sources()
    launchers = [_maa_pool._tile, _maa_pool._merge, _attention._fwd, _topk._scan, _topk._scan_wide,
                 _fusion_block._norm, _fusion_block._ffn]
    sizes = [[launcher.jit.fn.__name__, len(launcher.tuned.configs)] for launcher in launchers]
    for block_n in (16, 32, 64, 128):
        assert _maa_pool._prune_tile(_maa_pool._tile.configs, {}, BLOCK_N=block_n)
    for width in (64, 128, 256):
        kept = _topk._prune(_topk._scan.configs, {}, BLOCK_N=width)
        assert kept and all(c.kwargs["BLOCK_Q"] * width <= _topk._MERGE_BUDGET for c in kept)
    return sizes


def main(argv: list[str]) -> int:
    import triton
    from triton.backends.compiler import GPUTarget

    capabilities = [int(a) for a in argv] or [90, 87]
    print(json.dumps({"launchers": _check_launchers()}))
    failures = 0
    for cc in capabilities:
        for name, src, warps, *extra in cases(cc):
            estimate, stages = (extra + [None, None])[:2]  # norm + FFN: its shared-memory estimate and num_stages
            options = {"num_warps": warps, **({"num_stages": stages} if stages else {})}
            try:
                compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
                stats = _ptxas_stats(compiled.asm["ptx"], "sm_90a" if cc == 90 else f"sm_{cc}")
                print(json.dumps({"kernel": name, "cc": cc, "ok": True, "shared": compiled.metadata.shared,
                                  "estimate": estimate, **stats}), flush=True)
            except Exception as exc:  # noqa: BLE001 - report every kernel, fail at the end
                failures += 1
                error = f"{type(exc).__name__}: {exc}"[:2000]
                print(json.dumps({"kernel": name, "cc": cc, "ok": False, "error": error}))
    return 1 if failures else 0


def test_kernels_compile_for_nvidia_targets():
    """Every kernel compiles for sm_90 and sm_87 within the target's real shared memory; the norm + FFN estimate the
    pruning relies on is an upper bound of every compiled norm + FFN program. One process per target (in parallel)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {cc: subprocess.Popen([sys.executable, __file__, str(cc)], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for cc in (90, 87)}
    outs = {cc: p.communicate(timeout=600) for cc, p in procs.items()}
    rows = [json.loads(line) for out, _ in outs.values() for line in out.splitlines() if line.startswith('{"kernel"')]
    for cc, (out, err) in outs.items():
        assert any(line.startswith('{"launchers"') for line in out.splitlines()), err[-3000:]
    failed = [r for r in rows if not r["ok"]]
    assert not failed, "\n".join(f"{r['kernel']} sm_{r['cc']}: {r['error']}" for r in failed)
    assert all(p.returncode == 0 for p in procs.values()), [err[-3000:] for _, err in outs.values()]
    assert sorted(r["cc"] for r in rows) == [87] * 11 + [90] * 10
    for r in rows:
        where = f"{r['kernel']} sm_{r['cc']}"
        assert r["shared"] <= SHARED_LIMIT[r["cc"]], f"{where} needs {r['shared']} B of shared memory"
        if r["estimate"] is not None:
            assert r["shared"] <= r["estimate"], f"{where}: {r['shared']} B > the estimate {r['estimate']} B"
    assert {r["kernel"] for r in rows if r["cc"] == 87} >= {"norm_ffn_fp32_ff1024", "norm_ffn_fp16_ff1024"}


# --- on a CUDA device ---------------------------------------------------------------------------------------------

def _rel(out, ref):
    ref = ref.double().cpu()
    return ((out.double().cpu() - ref).abs() / (ref.abs() + ref.abs().max())).max().item()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_kernels_on_cuda_at_paper_sizes(dtype):
    import torch

    from fine_infer import kernels
    from fine_infer.kernels import reference

    dt, dev = getattr(torch, dtype), "cuda"
    rtol = 1e-5 if dtype == "float32" else 2e-3
    torch.manual_seed(0)
    with torch.no_grad(), kernels.use_backend("triton"):
        # Fashion-FINE pooling: B=32, 256 patches (+CLS), H=768
        x = torch.randn(32, 257, 768)
        w1, b1, w2 = torch.randn(768, 768) / 768**0.5, torch.randn(768) * 0.5, torch.randn(768) * 4 / 768**0.5
        got = kernels.maa_pool(*(t.to(dev, dt) for t in (x[:, 1:], w1, b1, w2)))
        assert _rel(got, reference.maa_pool(x[:, 1:].double(), w1.double(), b1.double(), w2.double())) <= rtol
        # MAAF attention: L=260 with a padded text, 8 heads of 64
        q, k, v = (torch.randn(32, 8, 260, 64) for _ in range(3))
        mask = torch.arange(260)[None, :] < torch.randint(246, 261, (32, 1))
        got = kernels.attention_fusion(*(t.to(dev, dt) for t in (q, k, v)), mask.to(dev))
        assert _rel(got, reference.attention_fusion(q.double(), k.double(), v.double(), mask)) <= rtol
        # search: 64 queries over 100k × 256, k = 10 and 1024
        qs, g = torch.randn(64, 256), torch.randn(100_000, 256)
        for kk in (10, 1024):
            s, i = kernels.similarity_topk(qs.to(dev, dt), g.to(dev, dt), kk)
            ref_s, _ = reference.similarity_topk(qs.to(dt).double(), g.to(dt).double(), kk)
            assert _rel(s, ref_s) <= rtol
            exact = (qs.to(dt).double() @ g.to(dt).double().T).gather(1, i.cpu())
            assert _rel(s, exact) <= rtol


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # before the kernel modules define their @triton.jit functions
    sys.exit(main(sys.argv[1:]))


def test_benchmark_script_runs_its_cases_in_the_interpreter():
    """benchmarks/bench_kernels.py: without CUDA it skips with a reason; --smoke runs cases end to end (checked
    against the reference) at tiny sizes in the interpreter, so the GPU benchmark does not rot unseen.

    The GPUs are hidden from the script (CUDA_VISIBLE_DEVICES=""), so this checks the same thing on a CUDA box; the
    GPU run itself (the full benchmark, minutes) is benchmarks/gpu_check.sh's and ``pytest benchmarks/bench_kernels.py``
    's.
    """
    bench = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "bench_kernels.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    res = subprocess.run([sys.executable, bench], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "skipped: needs a CUDA GPU" in res.stdout, res.stdout + res.stderr
    res = subprocess.run([sys.executable, bench, "--smoke", "-k", "MAAF"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    for provider in ("triton", "eager", "sdpa"):
        assert "attention MAAF" in res.stdout and f" {provider} " in res.stdout
