"""Triton kernels of Fashion-FINE's modality-agnostic adapter (MAA): the additive-attention pooler and the
adapter's integration epilogue. Private: :mod:`fine_infer.kernels` imports this module only to run a kernel.

Pooling is split over token tiles, flash-decoding style, so a batch of 32 rows still fills a GPU:

1. ``_maa_pool_tile_kernel``, one program per (row, tile of ``BLOCK_N`` tokens): the ``x @ W1ᵀ`` scores run as
   ``tl.dot`` over (``BLOCK_J`` hidden units × ``BLOCK_K`` inputs) blocks, ``tanh(· + b1) · w2`` is reduced on the
   fly, so the (B, N, H) hidden activations only ever exist as one (``BLOCK_N``, ``BLOCK_J``) register block. The
   tile then writes its softmax statistics (max ``m``, sum ``l``) and its un-normalised weighted sum of ``x``
   (``H`` floats) — x is read from DRAM once (the repeated reads of the tile hit L1/L2).
2. ``_maa_pool_merge_kernel``, one program per (row, ``BLOCK_H`` columns): the online-softmax merge of the
   tiles' (m, l, acc) triples, ``out = Σ e^(m_t-M) acc_t / Σ e^(m_t-M) l_t``; a row without a kept token is 0.

The adapter (:func:`patch_pool_adapter`) adds the two projections as two GEMMs over the stacked (CLS, pooled)
rows (cuBLAS on a GPU: a hand-written GEMM would not beat it at 2B×768×256) and one epilogue kernel,
``_mix_normalize_kernel``: ``norm((1-r)·norm(g) + r·norm(l))`` per row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fine_infer.kernels import _dispatch
from fine_infer.kernels._triton_utils import Launcher, configs, next_pow2, tanh

DTYPES = (torch.float16, torch.float32)


def _maa_pool_tile_kernel(
    x_ptr, w1_ptr, b1_ptr, w2_ptr, mask_ptr, acc_ptr, stats_ptr,
    N, H,
    stride_xb, stride_xn, stride_xh,
    stride_w1j, stride_w1k,
    stride_mb, stride_mn,
    stride_ab, stride_at,
    stride_sb, stride_st,
    HAS_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Scores, softmax statistics and the un-normalised weighted sum of one tile of ``BLOCK_N`` tokens."""
    b = tl.program_id(0).to(tl.int64)  # 64-bit batch offsets: large batches of long sequences exceed 2^31
    t = tl.program_id(1)
    offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = offs_n < N
    if HAS_MASK:
        keep = tl.load(mask_ptr + b * stride_mb + offs_n * stride_mn, mask=valid, other=0)
        valid = valid & (keep != 0)
    x_rows = x_ptr + b * stride_xb + offs_n[:, None] * stride_xn

    scores = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # A tile without a kept token (text padding) skips the H×H work entirely.
    if tl.sum(valid.to(tl.int32), axis=0) > 0:
        for j0 in range(0, H, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)
            hidden = tl.zeros((BLOCK_N, BLOCK_J), dtype=tl.float32)
            for k0 in range(0, H, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                xk = tl.load(x_rows + offs_k[None, :] * stride_xh,
                             mask=(offs_n[:, None] < N) & (offs_k[None, :] < H), other=0.0)
                # W1 block read transposed (BLOCK_K, BLOCK_J) so the dot is x @ W1ᵀ without a copy.
                wk = tl.load(w1_ptr + offs_j[None, :] * stride_w1j + offs_k[:, None] * stride_w1k,
                             mask=(offs_j[None, :] < H) & (offs_k[:, None] < H), other=0.0)
                hidden = tl.dot(xk, wk, hidden, input_precision="ieee")
            b1 = tl.load(b1_ptr + offs_j, mask=offs_j < H, other=0.0).to(tl.float32)
            w2 = tl.load(w2_ptr + offs_j, mask=offs_j < H, other=0.0).to(tl.float32)
            # Padded hidden units have w2 = 0, so they add nothing.
            scores += tl.sum(tanh(hidden + b1[None, :]) * w2[None, :], axis=1)

    scores = tl.where(valid, scores, float("-inf"))
    m = tl.max(scores, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # an all-masked tile: p = 0 everywhere, never NaN
    p = tl.exp(scores - m_safe)
    l = tl.sum(p, axis=0)
    tl.store(stats_ptr + b * stride_sb + t * stride_st, m)
    tl.store(stats_ptr + b * stride_sb + t * stride_st + 1, l)

    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        xt = tl.load(x_rows + offs_h[None, :] * stride_xh, mask=(offs_n[:, None] < N) & (offs_h[None, :] < H),
                     other=0.0).to(tl.float32)
        part = tl.sum(p[:, None] * xt, axis=0)
        tl.store(acc_ptr + b * stride_ab + t * stride_at + offs_h, part, mask=offs_h < H)


def _maa_pool_merge_kernel(
    acc_ptr, stats_ptr, out_ptr,
    T, H,
    stride_ab, stride_at,
    stride_sb, stride_st,
    stride_ob, stride_oh,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Online-softmax merge of the ``T`` tiles of one row over ``BLOCK_H`` columns."""
    b = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    stats = stats_ptr + b * stride_sb
    # Pass 1: the row max over the tiles' maxima.
    m_vec = tl.full((BLOCK_T,), float("-inf"), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        m_vec = tl.maximum(m_vec, tl.load(stats + offs_t * stride_st, mask=offs_t < T, other=float("-inf")))
    m_row = tl.max(m_vec, axis=0)
    m_safe = tl.where(m_row == float("-inf"), 0.0, m_row)
    # Pass 2: rescale and add.
    l_vec = tl.zeros((BLOCK_T,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_ok = offs_t < T
        m_t = tl.load(stats + offs_t * stride_st, mask=t_ok, other=float("-inf"))
        l_t = tl.load(stats + offs_t * stride_st + 1, mask=t_ok, other=0.0)
        w = tl.exp(m_t - m_safe)  # 0 for an all-masked tile (m_t = -inf)
        l_vec += w * l_t
        part = tl.load(acc_ptr + b * stride_ab + offs_t[:, None] * stride_at + offs_h[None, :],
                       mask=t_ok[:, None] & (offs_h[None, :] < H), other=0.0)
        acc += w[:, None] * part
    l_row = tl.sum(l_vec, axis=0)
    out = tl.sum(acc, axis=0) / tl.where(l_row > 0, l_row, 1.0)  # no kept token: acc = 0, out = 0
    tl.store(out_ptr + b * stride_ob + offs_h * stride_oh, out.to(out_ptr.dtype.element_ty), mask=offs_h < H)


def _mix_normalize_kernel(
    g_ptr, l_ptr, out_ptr,
    E, r,
    stride_g, stride_l, stride_o,
    BLOCK_E: tl.constexpr,
):
    """``norm((1 - r) · norm(g) + r · norm(l))`` for one row (``F.normalize``: ``x / max(‖x‖, 1e-12)``)."""
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK_E)
    ok = offs < E
    g = tl.load(g_ptr + b * stride_g + offs, mask=ok, other=0.0).to(tl.float32)
    lo = tl.load(l_ptr + b * stride_l + offs, mask=ok, other=0.0).to(tl.float32)
    g = g / tl.maximum(tl.sqrt(tl.sum(g * g, axis=0)), 1e-12)
    lo = lo / tl.maximum(tl.sqrt(tl.sum(lo * lo, axis=0)), 1e-12)
    e = (1.0 - r) * g + r * lo
    e = e / tl.maximum(tl.sqrt(tl.sum(e * e, axis=0)), 1e-12)
    tl.store(out_ptr + b * stride_o + offs, e.to(out_ptr.dtype.element_ty), mask=ok)


def _prune_tile(cfgs, named_args, **kwargs):
    """Keep the (BLOCK_N, BLOCK_J) hidden block and the (BLOCK_N, BLOCK_H) x block within 8K fp32 registers."""
    n = kwargs["BLOCK_N"]
    kept = [c for c in cfgs if n * c.kwargs["BLOCK_J"] <= 8192 and n * c.kwargs["BLOCK_H"] <= 8192]
    return kept or cfgs[:1]


_tile = Launcher(
    _maa_pool_tile_kernel,
    configs([{"BLOCK_J": j, "BLOCK_K": k, "BLOCK_H": 64} for j in (64, 128) for k in (32, 64)], stages=(3,)),
    key=["H", "BLOCK_N"],
    interpret={"BLOCK_J": 64, "BLOCK_K": 64, "BLOCK_H": 128},
    prune=_prune_tile,
)
_merge = Launcher(
    _maa_pool_merge_kernel,
    configs([{"BLOCK_T": 16, "BLOCK_H": h} for h in (64, 128, 256)], warps=(2, 4), stages=(1,)),
    key=["H"],
    interpret={"BLOCK_T": 16, "BLOCK_H": 128},
)
_mix = Launcher(_mix_normalize_kernel, [], key=[], interpret={})


def _block_n(batch: int, tokens: int, device: torch.device) -> int:
    """Tokens per tile. Every tile streams all of W1 (H² weights, from L2 after the first), so its L2 intensity is
    BLOCK_N flop/byte: large tiles feed the tensor cores, but there must be about a wave of (row, tile) programs
    to occupy the GPU. The largest tile that gives >= 3/4 of a wave wins. Chosen here, not tuned: it sets the
    workspace shape. (B=32, N=256: 64 on an H100's 132 SMs, 128 on an Orin's 16.)"""
    if _dispatch.interpreting():
        return 16
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    for block in (128, 64, 32):
        if 4 * batch * triton.cdiv(tokens, block) >= 3 * sms:
            return block
    return 16


def maa_pool(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, mask: torch.Tensor | None = None,
    *, out: torch.Tensor | None = None, block_n: int | None = None,
) -> torch.Tensor:
    """Triton :func:`fine_infer.kernels.reference.maa_pool`; ``out`` (B, H) in ``x``'s dtype may be given.

    ``block_n`` overrides the tokens per tile (tests use it to exercise several tiles on small inputs)."""
    if x.dim() != 3:
        raise ValueError(f"maa_pool: x must be (B, N, H); got {tuple(x.shape)}")
    B, N, H = x.shape
    if x.dtype not in DTYPES:
        raise ValueError(f"maa_pool: x must be float16 or float32; got {x.dtype}")
    if tuple(w1.shape) != (H, H) or tuple(b1.shape) != (H,) or tuple(w2.shape) != (H,):
        raise ValueError(f"maa_pool: w1 (H, H), b1 (H,), w2 (H,) with H={H}; got {tuple(w1.shape)}, "
                         f"{tuple(b1.shape)}, {tuple(w2.shape)}")
    if mask is not None and tuple(mask.shape) != (B, N):
        raise ValueError(f"maa_pool: mask must be (B, N) = {(B, N)}; got {tuple(mask.shape)}")
    out = _dispatch.check_out(out, (B, H), x.dtype, x.device)
    if B == 0 or H == 0:
        return out
    if N == 0:
        return out.zero_()
    w1 = w1.to(x.dtype)  # tl.dot takes one input dtype; a no-op for a model in one dtype
    b1, w2 = b1.contiguous(), w2.contiguous()
    if mask is not None:
        mask = mask.to(torch.bool).view(torch.uint8)  # same bytes, a dtype Triton loads as integers
    block_n = block_n or _block_n(B, N, x.device)
    T = triton.cdiv(N, block_n)
    acc = _dispatch.empty((B, T, H), torch.float32, x.device)
    stats = _dispatch.empty((B, T, 2), torch.float32, x.device)
    mask_arg = mask if mask is not None else stats  # never read when HAS_MASK is False
    _tile.launch(
        lambda m: (B, T),
        x, w1, b1, w2, mask_arg, acc, stats,
        N, H,
        x.stride(0), x.stride(1), x.stride(2),
        w1.stride(0), w1.stride(1),
        mask.stride(0) if mask is not None else 0, mask.stride(1) if mask is not None else 0,
        acc.stride(0), acc.stride(1),
        stats.stride(0), stats.stride(1),
        HAS_MASK=mask is not None, BLOCK_N=block_n,
    )
    _merge.launch(
        lambda m: (B, triton.cdiv(H, m["BLOCK_H"])),
        acc, stats, out,
        T, H,
        acc.stride(0), acc.stride(1),
        stats.stride(0), stats.stride(1),
        out.stride(0), out.stride(1),
    )
    return out


def patch_pool_adapter(
    tokens: torch.Tensor, mask: torch.Tensor | None,
    w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
    proj_w: torch.Tensor, proj_b: torch.Tensor, combine_w: torch.Tensor, combine_b: torch.Tensor,
    r: float, pool_start: int = 1, *, out: torch.Tensor | None = None, block_n: int | None = None,
) -> torch.Tensor:
    """Triton :func:`fine_infer.kernels.reference.patch_pool_adapter`; ``out`` (B, E) in ``tokens``' dtype."""
    if tokens.dim() != 3:
        raise ValueError(f"patch_pool_adapter: tokens must be (B, N, H); got {tuple(tokens.shape)}")
    B, N, H = tokens.shape
    if not 0 < pool_start <= N:
        raise ValueError(f"patch_pool_adapter: pool_start={pool_start} must be in 1..N={N}")
    if mask is not None and tuple(mask.shape) != (B, N):
        raise ValueError(f"patch_pool_adapter: mask must be (B, N) = {(B, N)}; got {tuple(mask.shape)}")
    P, E = proj_w.shape[0], combine_w.shape[0]
    if proj_w.shape[1] != H or combine_w.shape[1] != P or proj_b.shape != (P,) or combine_b.shape != (E,):
        raise ValueError(f"patch_pool_adapter: proj_w ({P}, {H}), combine_w ({E}, {P}) and their biases expected; "
                         f"got {tuple(proj_w.shape)}, {tuple(combine_w.shape)}, {tuple(proj_b.shape)}, "
                         f"{tuple(combine_b.shape)}")
    out = _dispatch.check_out(out, (B, E), tokens.dtype, tokens.device)
    if B == 0:
        return out
    # Rows 0..B-1: the CLS token, rows B..2B-1: the pooled patches, so each projection is one GEMM for both.
    feats = _dispatch.empty((2, B, H), tokens.dtype, tokens.device)
    feats[0].copy_(tokens[:, 0])
    maa_pool(tokens[:, pool_start:], w1, b1, w2, None if mask is None else mask[:, pool_start:], out=feats[1],
             block_n=block_n)
    dt = tokens.dtype
    c = F.linear(F.linear(feats.view(2 * B, H), proj_w.to(dt), proj_b.to(dt)), combine_w.to(dt), combine_b.to(dt))
    g, lo = c[:B], c[B:]
    _mix.launch(lambda m: (B,), g, lo, out, E, float(r), g.stride(0), lo.stride(0), out.stride(0),
                BLOCK_E=next_pow2(E, 16))
    return out
