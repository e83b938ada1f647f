"""Triton kernel of exact top-k inner-product search: query tiles × gallery tiles with a running top-k per query,
so the (Q, N) score matrix never reaches memory. Private: imported only to run a kernel.

Every candidate is one int64 **key**: the fp32 score mapped to an order-preserving int32 in the high word and
``2³¹-1-index`` in the low word. Keys are unique, larger key = better (higher score, then lower index), so the
reference's tie rule (lower index first) falls out of one integer comparison and sorting needs no payload.

``_similarity_topk_kernel``: one program per (``BLOCK_Q`` queries, gallery split). It keeps the best ``R`` keys
per query, ``R`` = ``BLOCK_N`` = the next power of two >= k (at least 128 on a GPU, 64 in the interpreter), and
scores the split's gallery in tiles of ``R`` rows: ``tl.dot`` over 16-64 queries up to R = 256; beyond (k > 256),
a few queries per program with CUDA-core products, because the merge's (BLOCK_Q, 2R) keys must fit in shared
memory. A tile is merged (a bitonic top-k of the ``2R`` keys) only when one of its keys beats a query's current
k-th key — after the first tiles almost none does (about ``k·ln(N/k)`` insertions per query over a random
gallery), so the scan runs at GEMM speed. Each split writes its ``R`` keys per query; the wrapper keeps the ``k``
largest of ``splits × R`` (``torch.topk`` on unique int64 keys: exact) and decodes scores and indices.

Precision: every dtype pair is scored to fp32 precision, as the reference does (promote, then fp32 dot products).
fp32 × fp32 runs IEEE fp32 dots, fp16 queries over an fp32 gallery are widened. fp32 queries over an fp16 gallery
(``SPLIT_Q``) keep the fp16 tensor cores without rounding the queries to fp16: each query row is scaled by a power of
two (exact) to a maximum in [0.5, 1), split into ``hi = fp16(q)`` and ``lo = fp16((q - hi) · 2¹¹)``, and scored as
``hi·g + lo·g / 2¹¹`` — two fp16 dots with fp32 accumulation, fp16 × fp16 products being exact in fp32. The query is
then carried to ~2⁻²⁴ of its largest element (fp32's own rounding), so the indices are the fp32 reference's up to
scores within fp32 rounding of each other; rounding the queries to fp16 instead agreed on only 95-98% of them. It
costs a second tensor-core pass, well under the gallery's memory time (KERNELS.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fine_infer.kernels import _dispatch, reference
from fine_infer.kernels._triton_utils import Launcher, configs, next_pow2

DTYPES = (torch.float16, torch.float32)
MAX_K = 1024
KEY_EMPTY = -(2**63)  # no candidate (a gallery shorter than k): decodes to (-inf, -1)
_LOW = 2**31 - 1


@triton.constexpr_function
def _log2(n):
    return int(n).bit_length() - 1


@triton.jit
def _indicator(n_dims: tl.constexpr, j: tl.constexpr):
    """0 for the left, 1 for the right element along hypercube axis ``n_dims - 1 - j``."""
    return tl.reshape(tl.arange(0, 2), [1] * (n_dims - j - 1) + [2] + [1] * j)


@triton.jit
def _compare_exchange(h, flip, i: tl.constexpr):
    """One bitonic compare-exchange along the ``i``-th innermost hypercube axis: the pair's min goes left (right
    where ``flip``). Uses min/max reductions over the size-2 axis — ``tl.sort``'s xor-reduction runs element by
    element in the interpreter, 100x slower — and compiles to the same warp shuffles on a GPU."""
    n_dims: tl.constexpr = _log2(h.numel)
    lo = tl.min(h, axis=n_dims - 1 - i, keep_dims=True)
    hi = tl.max(h, axis=n_dims - 1 - i, keep_dims=True)
    return tl.where((flip ^ _indicator(n_dims, i)) != 0, hi, lo)


@triton.jit
def _bitonic_stage(h, stage: tl.constexpr, order: tl.constexpr):
    """``stage`` rounds of compare-exchange; ``order`` 0 ascending, 1 descending, 2 alternating blocks."""
    if order == 2:
        flip = _indicator(_log2(h.numel), stage)
    else:
        flip = order
    for i in tl.static_range(stage):
        h = _compare_exchange(h, flip, stage - 1 - i)
    return h


@triton.jit
def _topk_lastdim(x, K: tl.constexpr):
    """The ``K`` largest of each row of ``x`` (rows × a power of two), sorted descending: bitonic top-k (sort blocks
    of ``K``, keep the larger of block pairs, re-merge), adapted from ``tl.topk`` in triton/language/standard.py."""
    log_n: tl.constexpr = _log2(x.shape[len(x.shape) - 1])
    log_k: tl.constexpr = _log2(K)
    h = tl.reshape(x, [2] * _log2(x.numel))
    for i in tl.static_range(1, log_k + 1):
        h = _bitonic_stage(h, i, 2 if i < log_n else 1)
    for i in tl.static_range(log_k + 1, log_n + 1):
        h = tl.max(h, axis=_log2(h.numel) - 1 - log_k)
        h = _bitonic_stage(h, log_k, 2 if i < log_n else 1)
    return tl.reshape(h, x.shape[:-1] + [K])


@triton.jit
def _pack_keys(scores, idx):
    """(fp32 score, int32 index) → int64 key, larger = better, ties broken by the lower index."""
    scores = tl.where(scores == 0.0, 0.0, scores)  # -0.0 and +0.0 are one score
    bits = scores.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: reverse their order, stay negative
    return (ordered.to(tl.int64) << 32) | (2147483647 - idx).to(tl.int64)


def _similarity_topk_kernel(
    q_ptr, g_ptr, keys_ptr,
    Q, N, D, K, tiles_per_split,
    stride_qm, stride_qd,
    stride_gn, stride_gd,
    stride_kq, stride_ks,
    USE_DOT: tl.constexpr, SPLIT_Q: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The best ``BLOCK_N`` keys of ``BLOCK_Q`` queries over one split of the gallery. ``SPLIT_Q``: fp32 queries over
    an fp16 gallery, scored as two fp16 dots (see the module docstring)."""
    pid_q = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = offs_q < Q
    cols = tl.arange(0, BLOCK_N)
    running = tl.full((BLOCK_Q, BLOCK_N), -9223372036854775808, dtype=tl.int64)
    kth = tl.full((BLOCK_Q,), -9223372036854775808, dtype=tl.int64)
    empty = tl.full((BLOCK_Q, BLOCK_N), -9223372036854775808, dtype=tl.int64)
    t_start = pid_s * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, tl.cdiv(N, BLOCK_N))
    for t in range(t_start, t_end):
        offs_n = t * BLOCK_N + cols
        n_ok = offs_n < N
        s = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.float32)
        s_lo = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = offs_d < D
            q = tl.load(q_ptr + offs_q[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                        mask=q_ok[:, None] & d_ok[None, :], other=0.0)
            # 64-bit row offsets: a 1M × 256 gallery is 2^28 elements, 10M rows would overflow int32
            gt = tl.load(g_ptr + offs_n[None, :].to(tl.int64) * stride_gn + offs_d[:, None] * stride_gd,
                         mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            if USE_DOT:
                if SPLIT_Q:  # q = hi + lo / 2^11, both fp16: two tensor-core dots, products exact in fp32
                    q32 = q.to(tl.float32)
                    hi = q32.to(tl.float16)
                    lo = ((q32 - hi.to(tl.float32)) * 2048.0).to(tl.float16)
                    s = tl.dot(hi, gt, s, input_precision="ieee")
                    s_lo = tl.dot(lo, gt, s_lo, input_precision="ieee")
                else:  # same dtypes, or fp16 queries widened to an fp32 gallery: exact
                    s = tl.dot(q.to(g_ptr.dtype.element_ty), gt, s, input_precision="ieee")
            else:  # fewer than 16 queries per program (large k): CUDA-core products, no tensor-core minimum
                s += tl.sum(q.to(tl.float32)[:, :, None] * gt.to(tl.float32)[None, :, :], axis=1)
        if SPLIT_Q:
            s += s_lo * (1.0 / 2048.0)
        keys = tl.where(n_ok[None, :], _pack_keys(s, offs_n), empty)
        if tl.sum((keys > kth[:, None]).to(tl.int32)) > 0:  # rare after the first tiles
            both = tl.reshape(tl.join(running, keys), (BLOCK_Q, 2 * BLOCK_N))
            running = _topk_lastdim(both, BLOCK_N)
            kth = tl.sum(tl.where(cols[None, :] == K - 1, running, 0), axis=1)
    tl.store(keys_ptr + offs_q[:, None] * stride_kq + pid_s * stride_ks + cols[None, :], running,
             mask=q_ok[:, None])


# The merge holds (BLOCK_Q, 2R) int64 keys, and its layout changes go through shared memory: BLOCK_Q · R <= 4096
# keeps that at 64 KB (an Orin SM has 164 KB, an H100 228 KB). Up to R = 256 the scores are a tl.dot over 16-64
# queries; beyond, a few queries per program with CUDA-core products (k > 256 is re-ranking, not the hot path).
_MERGE_BUDGET = 4096


def _prune(cfgs, named_args, **kwargs):
    width = kwargs["BLOCK_N"]
    kept = [c for c in cfgs if c.kwargs["BLOCK_Q"] * width <= _MERGE_BUDGET]
    return kept or [c for c in cfgs if c.kwargs["BLOCK_Q"] == 16]


_scan = Launcher(
    _similarity_topk_kernel,
    configs([{"BLOCK_Q": q, "BLOCK_D": d} for q in (16, 32, 64) for d in (64, 128)], warps=(4, 8), stages=(3,)),
    key=["D", "BLOCK_N"],  # BLOCK_N = R, the width bucket of k (re-tuning for every k would cost seconds)
    interpret={"BLOCK_Q": 16, "BLOCK_D": 64},
    prune=_prune,
)
_scan_wide = Launcher(  # R >= 512: BLOCK_Q is fixed by the wrapper
    _similarity_topk_kernel,
    configs([{"BLOCK_D": 8}], warps=(4, 8), stages=(1, 2)),
    key=["D", "BLOCK_N"],
    interpret={"BLOCK_D": 64},
)


def _decode(top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 keys → (float32 scores, int64 indices); :data:`KEY_EMPTY` → (-inf, -1)."""
    hi = top >> 32
    bits = torch.where(hi < 0, hi ^ 0x7FFFFFFF, hi).to(torch.int32).view(torch.float32)
    idx = _LOW - (top & 0xFFFFFFFF)
    empty = top == KEY_EMPTY
    return bits.masked_fill(empty, float("-inf")), idx.masked_fill(empty, -1)


def _plan(Q: int, N: int, width: int, device: torch.device) -> int:
    """Gallery tiles per split: about two (query block, split) programs per SM even if the autotuner picks the
    largest query block (64), so the gallery streams from every SM; no more splits than that, since the wrapper
    merges ``Q × splits × R`` candidate keys."""
    n_tiles = triton.cdiv(N, width)
    if _dispatch.interpreting():
        return triton.cdiv(n_tiles, min(n_tiles, 2))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    splits = triton.cdiv(2 * sms, triton.cdiv(Q, 64))
    splits = max(1, min(n_tiles, splits, 2**21 // (Q * width)))  # candidates <= 2M keys (16 MB)
    return triton.cdiv(n_tiles, splits)


def similarity_topk(
    queries: torch.Tensor, gallery: torch.Tensor, k: int,
    *, out: tuple[torch.Tensor, torch.Tensor] | None = None, tiles_per_split: int | None = None,
    min_width: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton :func:`fine_infer.kernels.reference.similarity_topk`: ``(scores (Q, k) float32, indices (Q, k)
    int64)``. ``out`` = (scores, indices) buffers may be given. ``tiles_per_split`` and ``min_width`` (gallery rows
    per tile) override the plan (tests use them to exercise the split merge and several tiles)."""
    if queries.dim() != 2 or gallery.dim() != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"similarity_topk: queries (Q, D) and gallery (N, D) expected; got {tuple(queries.shape)}, "
                         f"{tuple(gallery.shape)}")
    if queries.dtype not in DTYPES or gallery.dtype not in DTYPES:
        raise ValueError(f"similarity_topk: float16/float32 queries and gallery expected; got {queries.dtype}, "
                         f"{gallery.dtype}")
    if not 1 <= k <= MAX_K:
        raise ValueError(f"similarity_topk: k={k} must be in 1..{MAX_K} for the kernel")
    Q, D = queries.shape
    N = gallery.shape[0]
    if N >= 2**31 - 1:
        raise ValueError(f"similarity_topk: a gallery of {N} rows does not fit the kernel's 31-bit indices")
    o_scores, o_idx = out if out is not None else (None, None)
    o_scores = _dispatch.check_out(o_scores, (Q, k), torch.float32, queries.device, "out[0]")
    o_idx = _dispatch.check_out(o_idx, (Q, k), torch.int64, queries.device, "out[1]")
    if Q == 0:
        return o_scores, o_idx
    if N == 0 or D == 0:  # nothing to scan: the reference's answer (padding, or all-zero scores)
        ref_scores, ref_idx = reference.similarity_topk(queries, gallery, k)
        return o_scores.copy_(ref_scores), o_idx.copy_(ref_idx)
    width = next_pow2(k, min_width or (64 if _dispatch.interpreting() else 128))
    tps = tiles_per_split or _plan(Q, N, width, queries.device)
    splits = triton.cdiv(triton.cdiv(N, width), tps)
    keys = _dispatch.empty((Q, splits, width), torch.int64, queries.device)
    split = width <= 256 and queries.dtype == torch.float32 and gallery.dtype == torch.float16
    scale = None
    if width <= 256:
        launcher, fixed = _scan, {"USE_DOT": True, "SPLIT_Q": split}
        if split:  # each row scaled by a power of two (exact) to a maximum in [0.5, 1): hi and lo stay in fp16 range
            _, exponent = torch.frexp(queries.abs().amax(dim=1))
            scale = torch.ldexp(torch.ones(Q, device=queries.device), (-exponent).clamp(-126, 126))
            queries = queries * scale[:, None]
    else:
        launcher, fixed = _scan_wide, {"USE_DOT": False, "SPLIT_Q": False, "BLOCK_Q": max(1, 2048 // width)}
    launcher.launch(
        lambda m: (triton.cdiv(Q, m["BLOCK_Q"]), splits),
        queries, gallery, keys,
        Q, N, D, k, tps,
        queries.stride(0), queries.stride(1),
        gallery.stride(0), gallery.stride(1),
        keys.stride(0), keys.stride(1),
        BLOCK_N=width, **fixed,
    )
    top = torch.topk(keys.view(Q, splits * width), k, dim=1, sorted=True).values
    scores, idx = _decode(top)
    if scale is not None:
        scores = scores / scale[:, None]  # a power of two: exact, and -inf stays -inf
    o_scores.copy_(scores)
    o_idx.copy_(idx)
    return o_scores, o_idx
