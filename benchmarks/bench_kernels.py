"""Fused Triton kernels vs eager PyTorch at the papers' sizes, on a CUDA GPU.

    python benchmarks/bench_kernels.py                 # a table (ms, TFLOP/s, GB/s, % of the roofline floor)
    python benchmarks/bench_kernels.py --json out.json # and the rows as JSON
    pytest benchmarks/bench_kernels.py -s              # the same cases as tests; skipped without CUDA
    python benchmarks/bench_kernels.py --smoke         # tiny sizes on the CPU in the Triton interpreter: checks
                                                       # that every case runs, times nothing meaningful

Cases (fp16 unless noted; see benchmarks/KERNELS.md for the counts and the predictions made before measuring):

- ``maa_pool`` / ``patch_pool_adapter``: Fashion-FINE image side, B=32, N=256 patches (+CLS), H=768 → 256.
- ``attention``: MAAF, B=32, L=260 (245 image + text, padded), 8 heads × 64; RAF, B=32, L=127, 8 heads × 128.
  Providers: the kernel, the eager reference, ``F.scaled_dot_product_attention`` with the boolean mask.
- ``fusion_block``: one MAAF block (D=512, FF=128, L=260) and one RAF block (D=1024, FF=256, L=127).
- ``similarity_topk``: N=1M × D=256 gallery (fp16 or fp32), fp32 queries, k=10, Q=1 and 64. Providers: the kernel,
  ``torch.topk(q @ g.T)``, FAISS ``IndexFlatIP`` (GPU if faiss has GPU support, else CPU, Q=1 only) when installed.

Timing: ``triton.testing.do_bench`` (median of CUDA-event timings after warm-up; the first call of each kernel
autotunes, outside the timed region). Every provider's output is checked against the reference before timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Callable

import pytest
import torch

# Roofline floors: (dense fp16 tensor TFLOP/s, fp32 CUDA-core TFLOP/s, DRAM TB/s) — see KERNELS.md.
HARDWARE = {
    "H100 SXM": (989.0, 67.0, 3.35),
    "Jetson AGX Orin 64GB": (42.5, 5.3, 0.2048),
}


@dataclasses.dataclass
class Case:
    """One benchmark: providers (name → zero-arg callable) over the same inputs, with the work they must do."""

    name: str
    flops: float
    bytes: float  # the fused kernel's compulsory DRAM traffic
    providers: dict[str, Callable[[], object]]
    check: Callable[[str, object], float]  # provider name, its output → error vs the reference
    fp32: bool = False  # fp32 inputs: the compute floor is the CUDA cores' (IEEE fp32 dots, no TF32)
    baseline: str = "eager"  # the provider the speed-up column divides by


def _timer(fn: Callable[[], object], smoke: bool) -> float:
    """Median milliseconds of ``fn``."""
    if smoke:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _rel(out, ref) -> float:
    ref = ref.double()
    return ((out.double() - ref).abs() / (ref.abs() + ref.abs().max())).max().item()


def _triton(fn: Callable[[], object]) -> Callable[[], object]:
    from fine_infer import kernels

    def run():
        with kernels.use_backend("triton"):
            return fn()

    return run


def maa_cases(dev: str, dt, small: bool) -> list[Case]:
    from fine_infer import kernels
    from fine_infer.kernels import reference

    B, N, H, E = (2, 17, 32, 16) if small else (32, 256, 768, 256)
    tokens = torch.randn(B, N + 1, H, device=dev, dtype=dt)
    w1 = (torch.randn(H, H, device=dev) / H**0.5).to(dt)
    b1, w2 = (torch.randn(H, device=dev) * 0.5).to(dt), (torch.randn(H, device=dev) * 4 / H**0.5).to(dt)
    pw, pb = (torch.randn(E, H, device=dev) / H**0.5).to(dt), torch.zeros(E, device=dev, dtype=dt)
    cw, cb = (torch.randn(E, E, device=dev) / E**0.5).to(dt), torch.zeros(E, device=dev, dtype=dt)
    x = tokens[:, 1:]
    ref_pool = reference.maa_pool(x.double(), w1.double(), b1.double(), w2.double())
    ref_emb = reference.patch_pool_adapter(tokens.double(), None, w1.double(), b1.double(), w2.double(), pw.double(),
                                           pb.double(), cw.double(), cb.double(), 0.05, 1)
    size = 2 if dt == torch.float16 else 4
    pool_flops = 2 * B * N * H * H
    return [
        Case(f"maa_pool B={B} N={N} H={H}", pool_flops, B * N * H * size + H * H * size,
             {"triton": _triton(lambda: kernels.maa_pool(x, w1, b1, w2)),
              "eager": lambda: reference.maa_pool(x, w1, b1, w2)},
             lambda name, out: _rel(out, ref_pool), fp32=dt == torch.float32),
        Case(f"patch_pool_adapter B={B} N={N + 1} H={H} E={E}", pool_flops + 2 * 2 * B * (H * E + E * E),
             B * (N + 1) * H * size + (H * H + H * E + E * E) * size,
             {"triton": _triton(lambda: kernels.patch_pool_adapter(tokens, None, w1, b1, w2, pw, pb, cw, cb, 0.05)),
              "eager": lambda: reference.patch_pool_adapter(tokens, None, w1, b1, w2, pw, pb, cw, cb, 0.05)},
             lambda name, out: _rel(out, ref_emb), fp32=dt == torch.float32),
    ]


def attention_cases(dev: str, dt, small: bool) -> list[Case]:
    import torch.nn.functional as F

    from fine_infer import kernels
    from fine_infer.kernels import reference

    out = []
    shapes = [("MAAF", 2, 2, 21, 16, 15), ("RAF", 2, 2, 13, 32, 5)] if small else \
        [("MAAF", 32, 8, 260, 64, 245), ("RAF", 32, 8, 127, 128, 50)]
    for label, B, h, L, d, always in shapes:
        q, k, v = (torch.randn(B, L, h, d, device=dev, dtype=dt).transpose(1, 2) for _ in range(3))
        # image (and pooled) tokens always kept, then a text of random length
        mask = torch.arange(L, device=dev)[None, :] < torch.randint(always + 1, L + 1, (B, 1), device=dev)
        ref = reference.attention_fusion(q.double(), k.double(), v.double(), mask)
        sdpa_mask = mask[:, None, None, :]
        size = 2 if dt == torch.float16 else 4
        out.append(Case(
            f"attention {label} B={B} h={h} L={L} d={d}", 4 * B * h * L * L * d, 4 * B * h * L * d * size,
            {"triton": _triton(lambda q=q, k=k, v=v, m=mask: kernels.attention_fusion(q, k, v, m)),
             "eager": lambda q=q, k=k, v=v, m=mask: reference.attention_fusion(q, k, v, m),
             "sdpa": lambda q=q, k=k, v=v, m=sdpa_mask: F.scaled_dot_product_attention(q, k, v, attn_mask=m)},
            lambda name, o, ref=ref: _rel(o, ref), fp32=dt == torch.float32))
    return out


def fusion_block_cases(dev: str, dt, small: bool) -> list[Case]:
    from fine_infer import kernels
    from fine_infer.kernels import FusionBlockWeights, reference

    out = []
    shapes = [("MAAF", 2, 21, 32, 4, 16), ("RAF", 2, 13, 64, 2, 32)] if small else \
        [("MAAF", 32, 260, 512, 8, 128), ("RAF", 32, 127, 1024, 8, 256)]
    for label, B, L, D, h, FF in shapes:
        def lin(o, i):
            return torch.randn(o, i, device=dev) / i**0.5, torch.randn(o, device=dev) * 0.1

        (qw, qb), (kw, kb), (vw, vb), (ow, ob), (f1w, f1b), (f2w, f2b) = (
            lin(D, D), lin(D, D), lin(D, D), lin(D, D), lin(FF, D), lin(D, FF))
        ones, zeros = torch.ones(D, device=dev), torch.zeros(D, device=dev)
        w = FusionBlockWeights(ones, zeros, qw, qb, kw, kb, vw, vb, ow, ob, ones, zeros, f1w, f1b, f2w, f2b).to(dt)
        x = torch.randn(B, L, D, device=dev, dtype=dt)
        mask = torch.arange(L, device=dev)[None, :] < torch.randint(L // 2, L + 1, (B, 1), device=dev)
        ref = reference.fusion_block(x.double(), mask, w.to(torch.float64), h)
        size = 2 if dt == torch.float16 else 4
        M = B * L
        flops = 2 * M * D * D * 4 + 4 * B * h * L * L * (D // h) + 4 * M * D * FF
        traffic = M * D * size * 17 + (4 * D * D + 2 * D * FF) * size  # see KERNELS.md: ~17 (M, D) passes
        out.append(Case(
            f"fusion_block {label} B={B} L={L} D={D} FF={FF}", flops, traffic,
            {"triton": _triton(lambda x=x, m=mask, w=w, h=h: kernels.fusion_block(x, m, w, h)),
             "eager": lambda x=x, m=mask, w=w, h=h: reference.fusion_block(x, m, w, h)},
            lambda name, o, ref=ref: _rel(o, ref), fp32=dt == torch.float32))
    return out


def search_cases(dev: str, dt, small: bool) -> list[Case]:
    from fine_infer import kernels

    N, D, k = (1000, 32, 10) if small else (1_000_000, 256, 10)
    gallery = torch.nn.functional.normalize(torch.randn(N, D, device=dev), dim=1).to(dt)
    out = []
    for Q in (1, 64):
        queries = torch.nn.functional.normalize(torch.randn(Q, D, device=dev), dim=1)
        exact = (queries.double() @ gallery.double().T)
        best = torch.topk(exact, k, dim=1).values

        def check(name, res, exact=exact, best=best):
            scores, idx = res if isinstance(res, tuple) else (res.values, res.indices)
            return max(_rel(scores.float(), best), _rel(exact.gather(1, idx.long()), best))

        providers = {
            "triton": _triton(lambda q=queries: kernels.similarity_topk(q, gallery, k)),
            "torch.topk": lambda q=queries: torch.topk((q.to(dt) @ gallery.T).float(), k, dim=1),
        }
        faiss_search = _faiss(gallery, Q, k)
        if faiss_search is not None:
            providers["faiss"] = lambda q=queries, f=faiss_search: f(q)
        size = 2 if dt == torch.float16 else 4
        # fp32 queries: over an fp16 gallery the kernel scores them as two fp16 halves (fp32 precision, twice the
        # tensor-core FLOPs, still under the gallery's memory time); the FLOPs column counts the math, 2·Q·N·D
        out.append(Case(f"similarity_topk Q={Q} N={N} D={D} k={k} fp32 q, {str(dt)[6:]} g", 2 * Q * N * D, N * D * size,
                        providers, check, fp32=dt == torch.float32, baseline="torch.topk"))
    return out


def _faiss(gallery, Q: int, k: int):
    """A FAISS IndexFlatIP search over the same gallery (GPU if available; CPU for one query only), or None."""
    try:
        import faiss
    except ImportError:
        return None
    g = gallery.float().cpu().numpy()
    index = faiss.IndexFlatIP(g.shape[1])
    on_gpu = hasattr(faiss, "StandardGpuResources") and gallery.is_cuda
    if on_gpu:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), gallery.device.index or 0, index)
    elif Q > 1 and gallery.is_cuda:
        return None  # CPU FAISS at 64 queries × 1M takes seconds: not a comparison worth the wait
    index.add(g)

    def search(q):
        scores, idx = index.search(q.float().cpu().numpy(), k)
        return torch.from_numpy(scores).to(q.device), torch.from_numpy(idx).to(q.device)

    return search


FAMILIES = {"maa": maa_cases, "attention": attention_cases, "fusion_block": fusion_block_cases,
            "search": search_cases}
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def build(family: str, dtype: str, dev: str, small: bool) -> list[Case]:
    """The cases of one family in one dtype (built on demand: the search gallery alone is 0.5-1 GB)."""
    torch.manual_seed(0)
    return FAMILIES[family](dev, DTYPES[dtype], small)


def run_case(case: Case, smoke: bool) -> list[dict]:
    """Check then time every provider of ``case``; one row per provider, with roofline percentages."""
    rows = []
    for name, fn in case.providers.items():
        err = case.check(name, fn())  # also the warm-up / autotuning call
        ms = _timer(fn, smoke)
        row = {"case": case.name, "provider": name, "ms": ms, "error": err,
               "TFLOP/s": case.flops / ms / 1e9, "GB/s": case.bytes / ms / 1e6}
        for hw, (tc, fp32, bw) in HARDWARE.items():
            floor_ms = max(case.flops / ((fp32 if case.fp32 else tc) * 1e12), case.bytes / (bw * 1e12)) * 1e3
            row[f"floor {hw} ms"] = floor_ms
        rows.append(row)
    base = next(r["ms"] for r in rows if r["provider"] == case.baseline)
    for r in rows:
        r["speed-up"] = base / r["ms"]
    return rows


def _print(rows: list[dict]) -> None:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (smoke: interpreter, untimed)"
    print(f"\n{gpu}, torch {torch.__version__}")
    print(f"{'case':58} {'provider':11} {'ms':>9} {'TFLOP/s':>8} {'GB/s':>8} {'speed-up':>8} {'err':>8}")
    for r in rows:
        print(f"{r['case'][:58]:58} {r['provider']:11} {r['ms']:9.4f} {r['TFLOP/s']:8.2f} {r['GB/s']:8.1f} "
              f"{r['speed-up']:8.2f} {r['error']:8.1e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; on a CPU, in the Triton interpreter")
    parser.add_argument("-k", dest="select", default="", help="only cases whose name contains this")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        print("bench_kernels: skipped: needs a CUDA GPU (the Triton kernels run on CPU only in the interpreter, "
              "which times nothing meaningful); use --smoke to check the cases run")
        return 0
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module defines its @triton.jit functions
    rows = []
    with torch.no_grad():
        for dtype in DTYPES:
            for family in FAMILIES:
                for case in build(family, dtype, dev, small=args.smoke):
                    if args.select in case.name:
                        rows += run_case(case, args.smoke)
                torch.cuda.empty_cache() if dev == "cuda" else None
    _print(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "rows": rows}, f, indent=1)
    bad = [r for r in rows if not math.isfinite(r["error"]) or r["error"] > (5e-2 if r["provider"] == "sdpa" else 1e-2)]
    return 1 if bad else 0


# --- pytest entry points (pytest benchmarks/bench_kernels.py -s) -----------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; the kernels are benchmarked on one")
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_kernel_benchmark(family, dtype):
    rows = []
    with torch.no_grad():
        for case in build(family, dtype, "cuda", small=False):
            rows += run_case(case, smoke=False)
    _print(rows)
    for r in rows:
        assert math.isfinite(r["error"]) and r["error"] < 5e-2, r


if __name__ == "__main__":
    sys.exit(main())
