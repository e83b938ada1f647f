"""Plain PyTorch references of the fused blocks: the definition the Triton kernels must match.

These are also what the zoo models run by default (CPU, export): ONNX graphs are always traced from these.
Masks are bool with True = keep (a valid token), the same convention as an ``attention_mask``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping

import torch
import torch.nn.functional as F


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax and score accumulation run in float32, or float64 for float64 inputs (the tests' oracle)."""
    return torch.promote_types(dtype, torch.float32)


def maa_pool(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Fashion-FINE's additive-attention pooler over tokens.

    ``a = softmax_tokens(tanh(x @ w1.T + b1) @ w2)``, returns ``sum_tokens(a * x)`` of shape (B, H).
    ``x`` (B, N, H), ``w1`` (H, H), ``b1`` (H,), ``w2`` (H,), ``mask`` (B, N) bool, True = keep. A row whose tokens
    are all masked returns zeros.
    """
    scores = (torch.tanh(F.linear(x, w1, b1)) @ w2).to(_softmax_dtype(x.dtype))  # (B, N)
    if mask is not None:
        keep = mask.to(torch.bool)
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    attn = torch.softmax(scores, dim=-1)
    if mask is not None:
        # where, not a product: an all-masked row is 0 by definition, whatever its softmax holds
        attn = torch.where(keep.any(dim=-1, keepdim=True), attn, 0.0)
    return torch.einsum("bn,bnh->bh", attn.to(x.dtype), x)


def attention_fusion(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Masked multi-head attention, ``softmax(q k^T / sqrt(d)) v`` with padded keys excluded.

    ``q``, ``k``, ``v`` (B, heads, L, d); ``key_padding_mask`` (B, L) bool, True = keep. Returns (B, heads, L, d).
    A query whose keys are all masked returns zeros (defined, never NaN).
    """
    scale = q.shape[-1] ** -0.5
    scores = (q @ k.transpose(-1, -2)).to(_softmax_dtype(q.dtype)) * scale  # (B, h, L, L)
    if key_padding_mask is not None:
        keep = key_padding_mask.to(torch.bool)[:, None, None, :]
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    attn = torch.softmax(scores, dim=-1)
    if key_padding_mask is not None:
        attn = torch.where(keep.any(dim=-1, keepdim=True), attn, 0.0)
    return attn.to(v.dtype) @ v


def similarity_topk(queries: torch.Tensor, gallery: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` inner products of each query against the gallery: ``(scores (Q, k) float32, indices (Q, k) int64)``,
    best first, ties broken by the lower index. ``k`` larger than the gallery returns ``-inf`` / ``-1`` beyond it."""
    acc = _softmax_dtype(torch.promote_types(queries.dtype, gallery.dtype))
    scores = queries.to(acc) @ gallery.to(acc).T
    n = scores.shape[1]
    kk = min(k, n)
    # Stable descending sort gives the lower index first among equal scores.
    order = torch.sort(scores, dim=1, descending=True, stable=True)
    top_s, top_i = order.values[:, :kk].float(), order.indices[:, :kk]
    if kk < k:
        pad = k - kk
        top_s = torch.cat([top_s, torch.full((scores.shape[0], pad), float("-inf"), device=scores.device)], dim=1)
        top_i = torch.cat([top_i, torch.full((scores.shape[0], pad), -1, dtype=torch.int64, device=scores.device)],
                          dim=1)
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


NORM_KINDS = ("annotated", "layernorm")


@dataclass(frozen=True)
class FusionBlockWeights:
    """The tensors of one pre-norm attention-fusion block (MAAF / RAF), ``D`` wide with an ``F``-wide FFN.

    Linear weights are ``(out, in)`` as in ``nn.Linear``. :meth:`from_state_dict` reads the key layout of
    ``fine_infer.models._fusion.FusionBlock`` (``norm1``, ``attn.{q,k,v,out}_proj``, ``norm2``, ``ffn.w_1``,
    ``ffn.w_2``) without importing the models.
    """

    norm1_weight: torch.Tensor
    norm1_bias: torch.Tensor
    q_weight: torch.Tensor
    q_bias: torch.Tensor
    k_weight: torch.Tensor
    k_bias: torch.Tensor
    v_weight: torch.Tensor
    v_bias: torch.Tensor
    out_weight: torch.Tensor
    out_bias: torch.Tensor
    norm2_weight: torch.Tensor
    norm2_bias: torch.Tensor
    ffn1_weight: torch.Tensor
    ffn1_bias: torch.Tensor
    ffn2_weight: torch.Tensor
    ffn2_bias: torch.Tensor

    _KEYS: ClassVar[dict[str, str]] = {
        "norm1_weight": "norm1.weight", "norm1_bias": "norm1.bias",
        "q_weight": "attn.q_proj.weight", "q_bias": "attn.q_proj.bias",
        "k_weight": "attn.k_proj.weight", "k_bias": "attn.k_proj.bias",
        "v_weight": "attn.v_proj.weight", "v_bias": "attn.v_proj.bias",
        "out_weight": "attn.out_proj.weight", "out_bias": "attn.out_proj.bias",
        "norm2_weight": "norm2.weight", "norm2_bias": "norm2.bias",
        "ffn1_weight": "ffn.w_1.weight", "ffn1_bias": "ffn.w_1.bias",
        "ffn2_weight": "ffn.w_2.weight", "ffn2_bias": "ffn.w_2.bias",
    }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], prefix: str = "") -> "FusionBlockWeights":
        """The weights under ``prefix`` of a ``FusionBlock`` state dict (e.g. ``prefix="layers.0."``)."""
        missing = [prefix + k for k in cls._KEYS.values() if prefix + k not in state]
        if missing:
            raise KeyError(f"fusion block weights missing from the state dict: {', '.join(missing)}")
        return cls(**{field: state[prefix + key] for field, key in cls._KEYS.items()})

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "FusionBlockWeights":
        """All tensors in ``dtype`` on ``device``."""
        return FusionBlockWeights(**{f: getattr(self, f).to(device=device, dtype=dtype) for f in self._KEYS})


def block_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, kind: str = "annotated",
               eps: float = 1e-6) -> torch.Tensor:
    """The fusion block's norm over the last dim: ``annotated`` = ``w (x - mean) / (std_unbiased + eps) + b``
    (yahoo/maaf's Annotated-Transformer LayerNorm), ``layernorm`` = ``nn.LayerNorm`` (biased variance, eps inside
    the square root)."""
    if kind == "annotated":
        mean = x.mean(-1, keepdim=True)
        return weight * (x - mean) / (x.std(-1, keepdim=True) + eps) + bias
    if kind == "layernorm":
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    raise ValueError(f"unknown fusion norm {kind!r}; expected one of {NORM_KINDS}")


def fusion_block(
    x: torch.Tensor, key_padding_mask: torch.Tensor | None, weights: FusionBlockWeights, num_heads: int,
    norm: str = "annotated", eps: float = 1e-6,
) -> torch.Tensor:
    """One pre-norm attention-fusion block: ``x += attn(norm1(x))``, ``x += ffn(norm2(x))`` (inference, no dropout).

    ``x`` (B, L, D), ``key_padding_mask`` (B, L) bool True = keep or None; ``attn`` is multi-head
    :func:`attention_fusion` between the q/k/v and output projections, ``ffn`` = ``w_2(relu(w_1(·)))``.
    """
    B, L, D = x.shape
    if D % num_heads:
        raise ValueError(f"fusion width {D} is not divisible by {num_heads} heads")
    w = weights
    y = block_norm(x, w.norm1_weight, w.norm1_bias, norm, eps)

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(B, L, num_heads, D // num_heads).transpose(1, 2)

    q, k, v = (heads(F.linear(y, wt, bs)) for wt, bs in
               ((w.q_weight, w.q_bias), (w.k_weight, w.k_bias), (w.v_weight, w.v_bias)))
    a = attention_fusion(q, k, v, key_padding_mask).transpose(1, 2).reshape(B, L, D)
    x = x + F.linear(a, w.out_weight, w.out_bias)
    z = block_norm(x, w.norm2_weight, w.norm2_bias, norm, eps)
    return x + F.linear(F.relu(F.linear(z, w.ffn1_weight, w.ffn1_bias)), w.ffn2_weight, w.ffn2_bias)
