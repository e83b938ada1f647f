"""CLIP's text transformer (Radford et al. 2021, openai/CLIP ``clip/model.py``), used by RAF.

Token embedding + learned absolute positions → pre-norm residual attention blocks with CLIP's causal mask and a
QuickGELU MLP → ``ln_final``. Parameter names match CLIP's (``token_embedding``, ``positional_embedding``,
``transformer.resblocks.N.attn.in_proj_weight``, ``…mlp.c_fc``, ``ln_final``) so CLIP/RAF checkpoints load with a
prefix rename (and the token-id permutation :mod:`fine_infer.tokenization` documents).

Export notes: positions are gathered by indexing with ``arange(L)`` and the causal mask is built from ``arange``,
not by slicing ``[:L]``, so a dynamic sequence length exports without a ``L <= context_length`` guard.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from fine_infer.models._lstm_text import lookup


class QuickGELU(nn.Module):
    """CLIP's GELU approximation ``x * sigmoid(1.702 x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class CausalSelfAttention(nn.Module):
    """``nn.MultiheadAttention``'s parameter layout (``in_proj_weight``, ``in_proj_bias``, ``out_proj``) in plain torch,
    so it exports without the fused fast path."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"text width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """``x`` (B, L, D); ``attn_mask`` (L, L), bool True = may attend, or float added to the scores."""
        B, L, D = x.shape
        h = self.num_heads
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).reshape(B, L, 3, h, D // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, D))


class ResidualAttentionBlock(nn.Module):
    """CLIP's block: ``x += attn(ln_1(x))``, ``x += mlp(ln_2(x))``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(dim, num_heads)
        self.ln_1 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            OrderedDict([("c_fc", nn.Linear(dim, dim * 4)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(dim * 4, dim))])
        )
        self.ln_2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask)
        return x + self.mlp(self.ln_2(x))


class ClipTransformer(nn.Module):
    """A stack of :class:`ResidualAttentionBlock` (CLIP's ``Transformer``; ``resblocks`` is a ModuleList here so the
    mask can be passed, with the same keys as CLIP's ``nn.Sequential``)."""

    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.width = width
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


def causal_mask(length: int, device: torch.device | None = None) -> torch.Tensor:
    """(L, L) bool, True where query ``i`` may attend key ``j <= i`` (CLIP's ``build_attention_mask``)."""
    idx = torch.arange(length, device=device)
    return idx[None, :] <= idx[:, None]


class ClipTextTransformer(nn.Module):
    """``input_ids`` (B, L ≤ context_length) → ``ln_final`` features (B, L, width) for every position.

    The causal mask means position ``i`` sees only tokens ``≤ i``, so padding after the end token never changes the
    features up to it (CLIP uses no padding mask).
    """

    def __init__(self, vocab_size: int, context_length: int, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.context_length = context_length
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = ClipTransformer(width, layers, heads)
        self.ln_final = nn.LayerNorm(width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids`` (B, L) int64 → (B, L, width)."""
        L = input_ids.shape[1]
        positions = torch.arange(L, device=input_ids.device)
        # lookup(), not nn.Embedding (ONNX value-name clash with the "embedding" output, see _lstm_text.lookup);
        # gathering positions by arange(L) instead of slicing [:L] keeps L free of an L <= context_length guard.
        x = lookup(self.token_embedding.weight, input_ids) + lookup(self.positional_embedding, positions)[None]
        # Additive float mask as CLIP's (0 / -inf): a bool mask makes the exported SDPA guard fully masked rows with
        # IsNaN/Where, which the causal mask never has (every query sees itself).
        allowed = causal_mask(L, input_ids.device)
        mask = torch.zeros(L, L, dtype=x.dtype, device=x.device).masked_fill(~allowed, float("-inf"))
        x = self.transformer(x, mask)
        return self.ln_final(x)


__all__ = [
    "CausalSelfAttention",
    "ClipTextTransformer",
    "ClipTransformer",
    "QuickGELU",
    "ResidualAttentionBlock",
    "causal_mask",
]
