"""Triton kernel of the attention-fusion core: masked multi-head self-attention with an online softmax
(FlashAttention's forward, non-causal, with a key-padding mask). Private: imported only to run a kernel.

One program per (``BLOCK_M`` queries, batch × head), on a one-dimensional grid (``x`` takes 2³¹-1 programs; ``y``
and ``z`` only 65535, which a bulk batch × heads exceeds): program ``p`` is query block ``p % tiles`` of head
``p // tiles``, so the query blocks of one head run side by side and share its keys in L2. It streams the keys and
values in ``BLOCK_N`` tiles, keeping a running max ``m``, sum ``l`` and output accumulator per query, so the (L, L)
score matrix never reaches memory. Any ``L`` works (the last tiles are masked); a key tile whose keys are all padding
is skipped; a query whose keys are all masked has ``l = 0`` and returns zeros, never NaN (the running max is replaced
by 0 while it is still ``-inf``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fine_infer.kernels import _dispatch
from fine_infer.kernels._triton_utils import Launcher, configs, next_pow2

DTYPES = (torch.float16, torch.float32)
MAX_HEAD_DIM = 256

LOG2E = 1.4426950408889634


def _attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, o_ptr,
    num_heads, L, D, qk_scale,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_mb, stride_ml,
    HAS_MASK: tl.constexpr, L_BUCKET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``softmax(q kᵀ · scale, keys masked) v`` for ``BLOCK_M`` queries of one (batch, head).

    ``L_BUCKET`` (the next power of two of ``L``) is unused by the body: it is the autotuning key, so a new text
    length re-uses its bucket's blocks instead of re-tuning (and recompiles at most once per bucket)."""
    tiles = tl.cdiv(L, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % tiles
    pid_bh = pid // tiles
    b = (pid_bh // num_heads).to(tl.int64)  # 64-bit batch/head offsets for large batches
    h = (pid_bh % num_heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < L
    d_ok = offs_d < D
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :] * stride_qd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, L, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < L
        valid = n_ok
        if HAS_MASK:
            keep = tl.load(mask_ptr + b * stride_mb + offs_n * stride_ml, mask=n_ok, other=0)
            valid = valid & (keep != 0)
        if tl.sum(valid.to(tl.int32), axis=0) > 0:  # all-padding key tiles cost nothing
            kt = tl.load(k_base + offs_n[None, :] * stride_kl + offs_d[:, None] * stride_kd,
                         mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            # exp2 with log2(e) folded into the scale: one multiply per score.
            s = tl.dot(q, kt, input_precision="ieee") * qk_scale
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_base + offs_n[:, None] * stride_vl + offs_d[None, :] * stride_vd,
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # no kept key: acc = 0, out = 0
    tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :] * stride_od,
             out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


_fwd = Launcher(
    _attention_fwd_kernel,
    configs([{"BLOCK_M": m, "BLOCK_N": n} for m in (32, 64, 128) for n in (32, 64)], warps=(4, 8), stages=(3,)),
    key=["D", "L_BUCKET"],
    interpret={"BLOCK_M": 32, "BLOCK_N": 32},
)


def attention_fusion(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
    *, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton :func:`fine_infer.kernels.reference.attention_fusion`; any strides (the models pass transposed
    views); ``out`` (B, heads, L, d) in ``v``'s dtype may be given, with any strides too."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"attention_fusion: q, k, v must be (B, heads, L, d) alike; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"attention_fusion: q, k, v must share float16 or float32; got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    B, H, L, D = q.shape
    if D > MAX_HEAD_DIM:
        raise ValueError(f"attention_fusion: head dim {D} > {MAX_HEAD_DIM} is not supported by the kernel")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, L):
        raise ValueError(f"attention_fusion: key_padding_mask must be (B, L) = {(B, L)}; got "
                         f"{tuple(key_padding_mask.shape)}")
    out = _dispatch.check_out(out, (B, H, L, D), v.dtype, v.device)
    if out.numel() == 0:
        return out
    mask = key_padding_mask.to(torch.bool).view(torch.uint8) if key_padding_mask is not None else None
    _fwd.launch(
        lambda m: (triton.cdiv(L, m["BLOCK_M"]) * B * H,),  # one axis: B·H may exceed grid-y's 65535
        q, k, v, mask if mask is not None else q, out,
        H, L, D, D ** -0.5 * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        mask.stride(0) if mask is not None else 0, mask.stride(1) if mask is not None else 0,
        HAS_MASK=mask is not None, L_BUCKET=next_pow2(L), BLOCK_D=next_pow2(D, 16),
    )
    return out

