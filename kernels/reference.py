"""Plain PyTorch references of the fused blocks: the definition the Triton kernels must match.

These are also what the zoo models run by default (CPU, export): ONNX graphs are always traced from these.
Masks are bool with True = keep (a valid token), the same convention as an ``attention_mask``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def maa_pool(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Fashion-FINE's additive-attention pooler over tokens.

    ``a = softmax_tokens(tanh(x @ w1.T + b1) @ w2)``, returns ``sum_tokens(a * x)`` of shape (B, H).
    ``x`` (B, N, H), ``w1`` (H, H), ``b1`` (H,), ``w2`` (H,), ``mask`` (B, N) bool, True = keep. A row whose tokens
    are all masked returns zeros.
    """
    scores = torch.tanh(F.linear(x, w1, b1)) @ w2  # (B, N)
    if mask is not None:
        keep = mask.to(torch.bool)
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    attn = torch.softmax(scores.float(), dim=-1).to(x.dtype)
    if mask is not None:
        attn = attn * keep.any(dim=-1, keepdim=True).to(attn.dtype)
    return torch.einsum("bn,bnh->bh", attn, x)


def attention_fusion(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Masked multi-head attention, ``softmax(q k^T / sqrt(d)) v`` with padded keys excluded.

    ``q``, ``k``, ``v`` (B, heads, L, d); ``key_padding_mask`` (B, L) bool, True = keep. Returns (B, heads, L, d).
    A query whose keys are all masked returns zeros (defined, never NaN).
    """
    scale = q.shape[-1] ** -0.5
    scores = (q @ k.transpose(-1, -2)).float() * scale  # (B, h, L, L)
    if key_padding_mask is not None:
        keep = key_padding_mask.to(torch.bool)[:, None, None, :]
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    attn = torch.softmax(scores, dim=-1)
    if key_padding_mask is not None:
        attn = attn * keep.any(dim=-1, keepdim=True).to(attn.dtype)
    return (attn.to(v.dtype) @ v)


def similarity_topk(queries: torch.Tensor, gallery: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` inner products of each query against the gallery: ``(scores (Q, k) float32, indices (Q, k) int64)``,
    best first, ties broken by the lower index. ``k`` larger than the gallery returns ``-inf`` / ``-1`` beyond it."""
    scores = queries.float() @ gallery.float().T
    n = scores.shape[1]
    kk = min(k, n)
    # Stable descending sort gives the lower index first among equal scores.
    order = torch.sort(scores, dim=1, descending=True, stable=True)
    top_s, top_i = order.values[:, :kk], order.indices[:, :kk]
    if kk < k:
        pad = k - kk
        top_s = torch.cat([top_s, torch.full((scores.shape[0], pad), float("-inf"))], dim=1)
        top_i = torch.cat([top_i, torch.full((scores.shape[0], pad), -1, dtype=torch.int64)], dim=1)
    return top_s, top_i


def patch_pool_adapter(
    tokens: torch.Tensor,
    mask: torch.Tensor | None,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    proj_w: torch.Tensor,
    proj_b: torch.Tensor,
    combine_w: torch.Tensor,
    combine_b: torch.Tensor,
    r: float,
    pool_start: int = 1,
) -> torch.Tensor:
    """Fashion-FINE's modality-agnostic adapter (MAA) integration, from encoder tokens to the embedding.

    ``tokens`` (B, N, H) with the global (CLS) token first; pooling runs over ``tokens[:, pool_start:]``
    (1 for images, 2 for text) with ``mask`` (B, N) bool, True = keep (None = pool over every token, the paper's
    text behaviour). ``g = norm(combine(proj(cls)))``, ``l = norm(combine(proj(local)))``,
    returns ``norm((1 - r) g + r l)`` of shape (B, E).
    """
    cls = tokens[:, 0]
    x = tokens[:, pool_start:]
    m = mask[:, pool_start:] if mask is not None else None
    local = maa_pool(x, w1, b1, w2, m)
    g = F.normalize(F.linear(F.linear(cls, proj_w, proj_b), combine_w, combine_b), dim=-1)
    l = F.normalize(F.linear(F.linear(local, proj_w, proj_b), combine_w, combine_b), dim=-1)
    return F.normalize((1.0 - r) * g + r * l, dim=-1)
