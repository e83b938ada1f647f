"""The attention-fusion block of MAAF and RAF, and the poolings that read its output.

Modality-agnostic attention fusion (Dodds et al. 2020, yahoo/maaf ``src/maaf/models/transformer.py``, itself
"The Annotated Transformer"): image tokens and text tokens are concatenated into one sequence and run through
pre-norm transformer encoder blocks with a key-padding mask (image tokens always kept, text padding dropped), then a
final norm. No positional encoding.

The attention core is :func:`fine_infer.kernels.attention_fusion` so a fused Triton kernel can replace it; the
q/k/v/out projections, the pre-norms, the residuals and the FFN are plain modules around that call.

Norm: the official code uses the Annotated Transformer's LayerNorm, ``a * (x - mean) / (std + eps) + b`` with the
*unbiased* std and eps=1e-6 added to the std, not ``nn.LayerNorm`` (biased variance, eps inside the sqrt). That is
``norm="annotated"`` here (the default, for parity with official weights); ``norm="layernorm"`` uses ``nn.LayerNorm``.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fine_infer import kernels

NORM_KINDS = ("annotated", "layernorm")


class AnnotatedLayerNorm(nn.Module):
    """``weight * (x - mean) / (std + eps) + bias`` over the last dim, std unbiased (yahoo/maaf's ``LayerNorm``,
    whose parameters are named ``a_2``/``b_2``)."""

    def __init__(self, features: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(features))
        self.bias = nn.Parameter(torch.zeros(features))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        std = x.std(-1, keepdim=True)  # unbiased, as torch.Tensor.std defaults to and the official code relies on
        return self.weight * (x - mean) / (std + self.eps) + self.bias


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """The pre-norm/final-norm module of a fusion encoder (``annotated`` or ``layernorm``)."""
    if kind == "annotated":
        return AnnotatedLayerNorm(dim, eps)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    raise ValueError(f"unknown fusion norm {kind!r}; expected one of {NORM_KINDS}")


class FusionAttention(nn.Module):
    """Multi-head self-attention with a key-padding mask; the core is ``kernels.attention_fusion``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"fusion width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        """``x`` (B, L, D), ``key_padding_mask`` (B, L) bool True = keep → (B, L, D)."""
        B, L, D = x.shape
        h = self.num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(B, L, h, D // h).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        out = kernels.attention_fusion(q, k, v, key_padding_mask)  # (B, h, L, d); a Triton kernel on CUDA
        return self.out_proj(out.transpose(1, 2).reshape(B, L, D))


class FeedForward(nn.Module):
    """Position-wise FFN ``w_2(relu(w_1(x)))`` (names as in the official ``PositionwiseFeedForward``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w_1 = nn.Linear(dim, hidden)
        self.w_2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.relu(self.w_1(x)))


class FusionBlock(nn.Module):
    """Pre-norm encoder block: ``x += attn(norm1(x))``, ``x += ffn(norm2(x))`` (dropout omitted: inference only)."""

    def __init__(self, dim: int, num_heads: int, ff_dim: int, norm: str = "annotated", eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = make_norm(norm, dim, eps)
        self.attn = FusionAttention(dim, num_heads)
        self.norm2 = make_norm(norm, dim, eps)
        self.ffn = FeedForward(dim, ff_dim)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_padding_mask)
        return x + self.ffn(self.norm2(x))


class FusionEncoder(nn.Module):
    """``num_blocks`` :class:`FusionBlock` s and a final norm over a concatenated token sequence."""

    def __init__(
        self, dim: int, num_blocks: int, num_heads: int, ff_dim: int, norm: str = "annotated", eps: float = 1e-6
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(FusionBlock(dim, num_heads, ff_dim, norm, eps) for _ in range(num_blocks))
        self.norm = make_norm(norm, dim, eps)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (B, L, D); ``key_padding_mask`` (B, L) bool True = keep, or None (every token kept)."""
        for layer in self.layers:
            x = layer(x, key_padding_mask)
        return self.norm(x)


def fuse_tokens(
    encoder: FusionEncoder, image_tokens: torch.Tensor, text_tokens: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``encoder`` over ``image_tokens ⊕ text_tokens``; returns the fused image part and text part.

    Image tokens are always kept; text tokens are kept where ``attention_mask`` (B, T) is non-zero.
    """
    B, N = image_tokens.shape[0], image_tokens.shape[1]
    keep = torch.cat([torch.ones(B, N, dtype=torch.bool, device=image_tokens.device), attention_mask != 0], dim=1)
    fused = encoder(torch.cat([image_tokens, text_tokens], dim=1), keep)
    return fused[:, :N], fused[:, N:]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` (B, T, D) over the tokens where ``mask`` (B, T) is non-zero (yahoo/maaf ``pool_text``).

    A row without any kept token returns zeros (the official code divides by zero there)."""
    m = (mask != 0).to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


def resolutionwise_pool(x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """MAAF's "rwpool": the mean of the tokens of each resolution (consecutive groups of ``sizes``), then the mean
    of those means (yahoo/maaf ``ResNet.resolutionwise_pool``). ``x`` (B, sum(sizes), D) → (B, D)."""
    if sum(sizes) != x.shape[1]:
        raise ValueError(f"rwpool groups {tuple(sizes)} do not add up to {x.shape[1]} tokens")
    means, start = [], 0
    for n in sizes:
        means.append(x[:, start : start + n].mean(dim=1))
        start += n
    return torch.stack(means, dim=0).mean(dim=0)


def pool_image(x: torch.Tensor, sizes: Sequence[int], output: str) -> torch.Tensor:
    """Pool fused image tokens: ``rwpool`` (per resolution, then across) or ``mean`` (over all tokens)."""
    if output == "rwpool":
        return resolutionwise_pool(x, sizes)
    if output == "mean":
        return x.mean(dim=1)
    raise ValueError(f"unknown MAAF output pooling {output!r}; expected 'rwpool' or 'mean'")


# Official (yahoo/maaf) encoder keys → ours, relative to the encoder. ``linears`` 0..3 are q, k, v, out;
# ``sublayer.0`` is the attention's pre-norm, ``sublayer.1`` the FFN's; ``a_2``/``b_2`` are weight/bias.
_OFFICIAL_RENAMES = (
    (re.compile(r"^layers\.(\d+)\.self_attn\.linears\.0\."), r"layers.\1.attn.q_proj."),
    (re.compile(r"^layers\.(\d+)\.self_attn\.linears\.1\."), r"layers.\1.attn.k_proj."),
    (re.compile(r"^layers\.(\d+)\.self_attn\.linears\.2\."), r"layers.\1.attn.v_proj."),
    (re.compile(r"^layers\.(\d+)\.self_attn\.linears\.3\."), r"layers.\1.attn.out_proj."),
    (re.compile(r"^layers\.(\d+)\.feed_forward\."), r"layers.\1.ffn."),
    (re.compile(r"^layers\.(\d+)\.sublayer\.0\.norm\."), r"layers.\1.norm1."),
    (re.compile(r"^layers\.(\d+)\.sublayer\.1\.norm\."), r"layers.\1.norm2."),
    (re.compile(r"\.a_2$"), ".weight"),
    (re.compile(r"\.b_2$"), ".bias"),
)


def rename_official_encoder_key(key: str) -> str:
    """Map one key of yahoo/maaf's ``Encoder`` (relative to it) to :class:`FusionEncoder`'s."""
    for pattern, repl in _OFFICIAL_RENAMES:
        key = pattern.sub(repl, key)
    return key


def official_encoder_key(key: str) -> str:
    """The inverse of :func:`rename_official_encoder_key` (used by tests to fake official checkpoints)."""
    inverse = (
        (r"\.attn\.q_proj\.", ".self_attn.linears.0."),
        (r"\.attn\.k_proj\.", ".self_attn.linears.1."),
        (r"\.attn\.v_proj\.", ".self_attn.linears.2."),
        (r"\.attn\.out_proj\.", ".self_attn.linears.3."),
        (r"\.ffn\.", ".feed_forward."),
        (r"\.norm1\.", ".sublayer.0.norm."),
        (r"\.norm2\.", ".sublayer.1.norm."),
        (r"norm\.weight$", "norm.a_2"),
        (r"norm\.bias$", "norm.b_2"),
    )
    for pattern, repl in inverse:
        key = re.sub(pattern, repl, key)
    return key


__all__ = [
    "AnnotatedLayerNorm",
    "FeedForward",
    "FusionAttention",
    "FusionBlock",
    "FusionEncoder",
    "NORM_KINDS",
    "fuse_tokens",
    "make_norm",
    "masked_mean",
    "official_encoder_key",
    "pool_image",
    "rename_official_encoder_key",
    "resolutionwise_pool",
]
