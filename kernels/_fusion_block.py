"""Triton path of the whole attention-fusion block (MAAF / RAF): fused where it pays, cuBLAS where it does not.

``x (B, L, D)`` → ``x + out_proj(attn(norm1(x)))`` → ``+ ffn(norm2(·))``, as 7 launches instead of eager's ~30, and
17 passes over a (B·L, D) activation instead of ~45 (plus eager attention's (B, h, L, L) scores):

1. ``_block_norm_kernel``: norm1 (annotated or nn.LayerNorm) in one program per ``BLOCK_M`` rows.
2. The q, k, v projections (``F.linear``: cuBLAS).
3. The attention kernel (:mod:`._attention`) reads q/k/v as strided (B, heads, L, d) views and writes heads
   straight into (B, L, heads, d) order, so no transpose is ever copied.
4. The output projection as ``torch.addmm(x, attn, Woᵀ)`` (the residual rides in cuBLAS's epilogue), then
   ``_norm_ffn_kernel``: ``+ b_o``, norm2, ``w_1``, ReLU, ``w_2``, ``+ b_2`` and the residual in one program per
   ``BLOCK_M`` rows — the FFN is narrow (F = 128 for MAAF, 256 for RAF), so its hidden activations stay in
   registers and the (B·L, F) tensor never reaches memory.

The norm + FFN kernel's shared memory grows with the FFN width (:func:`ffn_shared_bytes`): its configs are pruned to
the device's limit (163 KB on an Orin, 227 KB on an H100, 99 KB on sm_86/89), a smaller block (16 × 16) is tried only
when nothing else fits (fp32 with FF = 1024 on an Orin), and a width no config fits is refused before launching
(:func:`ffn_unsupported`; the ``auto`` backend then runs the reference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fine_infer.kernels import _dispatch
from fine_infer.kernels._attention import attention_fusion
from fine_infer.kernels._triton_utils import Launcher, configs, next_pow2, shared_memory_limit
from fine_infer.kernels.reference import NORM_KINDS, FusionBlockWeights

DTYPES = (torch.float16, torch.float32)
MAX_FFN = 1024


@triton.jit
def _row_stats(x_ptr, bias_ptr, rows, r_ok, D, eps, stride_xm,
               ANNOTATED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Mean and 1/denominator of ``x (+ bias)`` per row; two passes (mean, then centred squares) for accuracy."""
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        ok = r_ok[:, None] & (offs_d[None, :] < D)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x += tl.load(bias_ptr + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)[None, :]
        total += tl.sum(tl.where(ok, x, 0.0), axis=1)
    mean = total / D
    sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        ok = r_ok[:, None] & (offs_d[None, :] < D)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x += tl.load(bias_ptr + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)[None, :]
        xc = tl.where(ok, x - mean[:, None], 0.0)
        sq += tl.sum(xc * xc, axis=1)
    if ANNOTATED:  # w (x - mean) / (std_unbiased + eps) + b
        inv = 1.0 / (tl.sqrt(sq / (D - 1)) + eps)
    else:  # nn.LayerNorm: (x - mean) / sqrt(var_biased + eps)
        inv = 1.0 / tl.sqrt(sq / D + eps)
    return mean, inv


def _block_norm_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    M, D, eps,
    stride_xm, stride_ym,
    ANNOTATED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``y = norm(x)`` for ``BLOCK_M`` rows."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = rows < M
    mean, inv = _row_stats(x_ptr, x_ptr, rows, r_ok, D, eps, stride_xm, ANNOTATED, False, BLOCK_M, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        ok = r_ok[:, None] & d_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        y = (x - mean[:, None]) * inv[:, None] * w[None, :] + b[None, :]
        tl.store(y_ptr + rows[:, None] * stride_ym + offs_d[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)


def _norm_ffn_kernel(
    x_ptr, xb_ptr, nw_ptr, nb_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr,
    M, D, FF, eps,
    stride_xm, stride_w1f, stride_w1d, stride_w2d, stride_w2f, stride_om,
    ANNOTATED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """``r = x + xb``; ``out = r + w_2(relu(w_1(norm(r)) + b_1)) + b_2`` for ``BLOCK_M`` rows, hidden in registers."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = rows < M
    offs_f = tl.arange(0, BLOCK_F)
    f_ok = offs_f < FF
    mean, inv = _row_stats(x_ptr, xb_ptr, rows, r_ok, D, eps, stride_xm, ANNOTATED, True, BLOCK_M, BLOCK_D)
    hidden = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        ok = r_ok[:, None] & d_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
        x += tl.load(xb_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        w = tl.load(nw_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        b = tl.load(nb_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        z = tl.where(ok, (x - mean[:, None]) * inv[:, None] * w[None, :] + b[None, :], 0.0)
        w1t = tl.load(w1_ptr + offs_f[None, :] * stride_w1f + offs_d[:, None] * stride_w1d,
                      mask=f_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_F) = W1ᵀ block
        hidden = tl.dot(z.to(w1t.dtype), w1t, hidden, input_precision="ieee")
    b1 = tl.load(b1_ptr + offs_f, mask=f_ok, other=0.0).to(tl.float32)
    hidden = tl.maximum(hidden + b1[None, :], 0.0)  # padded FFN units: relu(0 + 0) = 0
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        ok = r_ok[:, None] & d_ok[None, :]
        w2t = tl.load(w2_ptr + offs_d[None, :] * stride_w2d + offs_f[:, None] * stride_w2f,
                      mask=d_ok[None, :] & f_ok[:, None], other=0.0)  # (BLOCK_F, BLOCK_D) = W2ᵀ block
        y = tl.dot(hidden.to(w2t.dtype), w2t, input_precision="ieee")
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
        x += tl.load(xb_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        b2 = tl.load(b2_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows[:, None] * stride_om + offs_d[None, :],
                 (x + y + b2[None, :]).to(out_ptr.dtype.element_ty), mask=ok)


_norm = Launcher(
    _block_norm_kernel,
    configs([{"BLOCK_M": m, "BLOCK_D": 256} for m in (4, 8, 16)], warps=(4, 8), stages=(1,)),
    key=["D"],
    interpret={"BLOCK_M": 16, "BLOCK_D": 128},
)
FFN_SPACE = [{"BLOCK_M": m, "BLOCK_D": d} for m in (16, 32, 64) for d in (32, 64)]
FFN_SMALL = {"BLOCK_M": 16, "BLOCK_D": 16}  # tried only when no block of FFN_SPACE fits the device's shared memory


def ffn_shared_bytes(block_m: int, block_d: int, block_f: int, elem_bytes: int) -> int:
    """Shared memory of one norm + FFN program: the second GEMM's operands, the hidden (BLOCK_M, BLOCK_F) block and a
    (BLOCK_F, BLOCK_D) block of W2ᵀ, plus a (BLOCK_M, BLOCK_D) layout conversion, in the weights' dtype. Exact for the
    compiled kernels measured with Triton 3.7 / ptxas (e.g. fp32, 16 × 32, FF 1024: 198,656 B), and checked as an
    upper bound against every compile of tests/kernels/test_gpu_compile.py."""
    return elem_bytes * (block_m * block_f + block_f * block_d + block_m * block_d)


def fit_ffn_configs(cfgs, shared_limit: int | None, block_f: int, elem_bytes: int) -> list:
    """The configs of ``cfgs`` whose program fits ``shared_limit`` bytes (None: no limit, the interpreter); the small
    fallback block only when no regular one fits. Empty when none does."""
    fits = [c for c in cfgs if shared_limit is None
            or ffn_shared_bytes(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_D"], block_f, elem_bytes) <= shared_limit]
    return [c for c in fits if c.kwargs != FFN_SMALL] or fits


def ffn_unsupported(ff: int, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why no norm + FFN config fits ``device`` for an FFN of width ``ff`` in ``dtype`` (None: one does)."""
    limit = shared_memory_limit(device)
    if limit is None:
        return None
    block_f, size = next_pow2(ff, 16), torch.empty((), dtype=dtype).element_size()
    if fit_ffn_configs(_ffn.configs, limit, block_f, size):
        return None
    need = min(ffn_shared_bytes(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_D"], block_f, size) for c in _ffn.configs)
    return (f"FFN width {ff} in {str(dtype)[6:]} needs {need // 1024} KB of shared memory per program; "
            f"{device} has {limit // 1024} KB")


def _prune_ffn(cfgs, named_args, **kwargs):
    """Autotuner hook: the configs that fit the device's shared memory (the wrapper has refused a width none fits)."""
    w1 = named_args["w1_ptr"]
    return fit_ffn_configs(cfgs, shared_memory_limit(w1.device), kwargs["BLOCK_F"], w1.element_size())


_ffn = Launcher(
    _norm_ffn_kernel,
    configs(FFN_SPACE, warps=(4, 8), stages=(2,)) + configs([FFN_SMALL], warps=(4,), stages=(2,)),
    key=["D", "FF"],
    interpret={"BLOCK_M": 32, "BLOCK_D": 64},
    prune=_prune_ffn,
)


def block_norm(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, kind: str, eps: float,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton :func:`fine_infer.kernels.reference.block_norm` over the rows of a (M, D) tensor."""
    M, D = x2d.shape
    out = _dispatch.check_out(out, (M, D), x2d.dtype, x2d.device)
    _norm.launch(lambda m: (triton.cdiv(M, m["BLOCK_M"]),), x2d, weight.contiguous(), bias.contiguous(), out,
                 M, D, float(eps), x2d.stride(0), out.stride(0), ANNOTATED=kind == "annotated")
    return out


def fusion_block(
    x: torch.Tensor, key_padding_mask: torch.Tensor | None, weights: FusionBlockWeights, num_heads: int,
    norm: str = "annotated", eps: float = 1e-6, *, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton :func:`fine_infer.kernels.reference.fusion_block`; ``out`` (B, L, D) in ``x``'s dtype may be given."""
    if x.dim() != 3:
        raise ValueError(f"fusion_block: x must be (B, L, D); got {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"fusion_block: x must be float16 or float32; got {x.dtype}")
    if norm not in NORM_KINDS:
        raise ValueError(f"unknown fusion norm {norm!r}; expected one of {NORM_KINDS}")
    B, L, D = x.shape
    if D % num_heads:
        raise ValueError(f"fusion width {D} is not divisible by {num_heads} heads")
    w = weights.to(dtype=x.dtype)
    FF = w.ffn1_weight.shape[0]
    if tuple(w.ffn1_weight.shape) != (FF, D) or tuple(w.ffn2_weight.shape) != (D, FF) or FF > MAX_FFN:
        raise ValueError(f"fusion_block: ffn weights ({FF}, {D}) and ({D}, {FF}) with FF <= {MAX_FFN} expected; got "
                         f"{tuple(w.ffn1_weight.shape)}, {tuple(w.ffn2_weight.shape)}")
    why = ffn_unsupported(FF, x.dtype, x.device)
    if why:
        raise ValueError(f"fusion_block: {why}")
    out = _dispatch.check_out(out, (B, L, D), x.dtype, x.device)
    if out.numel() == 0:
        return out
    heads, d = num_heads, D // num_heads
    x2 = x.reshape(B * L, D)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    y = block_norm(x2, w.norm1_weight, w.norm1_bias, norm, eps, out=_dispatch.empty((B * L, D), x.dtype, x.device))
    # Three GEMMs rather than one over stacked weights: stacking would copy 3·D² weights on every call.
    q, k, v = (F.linear(y, wt, bs).view(B, L, heads, d).transpose(1, 2)  # (B, heads, L, d) views, no copies
               for wt, bs in ((w.q_weight, w.q_bias), (w.k_weight, w.k_bias), (w.v_weight, w.v_bias)))
    attn = _dispatch.empty((B, L, heads, d), x.dtype, x.device)
    attention_fusion(q, k, v, key_padding_mask, out=attn.transpose(1, 2))
    x1 = torch.addmm(x2, attn.view(B * L, D), w.out_weight.t())  # x + attn Woᵀ; b_o is added in the FFN kernel
    o2 = out.view(B * L, D) if out.is_contiguous() else _dispatch.empty((B * L, D), x.dtype, x.device)
    _ffn.launch(
        lambda m: (triton.cdiv(B * L, m["BLOCK_M"]),),
        x1, w.out_bias.contiguous(), w.norm2_weight.contiguous(), w.norm2_bias.contiguous(),
        w.ffn1_weight, w.ffn1_bias.contiguous(), w.ffn2_weight, w.ffn2_bias.contiguous(), o2,
        B * L, D, FF, float(eps),
        x1.stride(0), w.ffn1_weight.stride(0), w.ffn1_weight.stride(1), w.ffn2_weight.stride(0),
        w.ffn2_weight.stride(1), o2.stride(0),
        ANNOTATED=norm == "annotated", BLOCK_F=next_pow2(FF, 16),
    )
    if o2.data_ptr() != out.data_ptr():
        out.copy_(o2.view(B, L, D))
    return out
