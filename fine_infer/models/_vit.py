"""A plain-PyTorch Vision Transformer with ALBEF's parameter names (``models/vit.py`` of salesforce/ALBEF, copied
into Fashion-FINE and FashionSAP), so an official ``visual_encoder.*`` state dict loads without renaming.

Layout: ``patch_embed.proj`` (Conv2d, stride = patch), ``cls_token``, ``pos_embed`` (CLS + grid), pre-norm
``blocks.{i}`` (``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``), final ``norm``.
Attention goes through :func:`torch.nn.functional.scaled_dot_product_attention`, which exports to ONNX cleanly.
GELU is the exact (erf) form, as ``nn.GELU()`` in the original.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbed(nn.Module):
    """Non-overlapping patches → tokens: ``proj`` is a Conv2d with kernel = stride = ``patch_size``."""

    def __init__(self, image_size: int, patch_size: int, in_chans: int, width: int) -> None:
        super().__init__()
        self.grid = image_size // patch_size
        self.num_patches = self.grid * self.grid
        self.proj = nn.Conv2d(in_chans, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, C, S, S) → (B, grid², width), row-major over the grid (timm/ALBEF order)."""
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (bias on) and an output ``proj``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, width * 3, bias=True)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, N, W) → (B, N, W); every token attends to every token (no mask: images have no padding)."""
        B, N, W = x.shape
        # (B, N, 3, h, d) → three (B, h, N, d); -1 keeps the head size static for export.
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, W))


class Mlp(nn.Module):
    """``fc1`` → exact GELU → ``fc2``."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Position-wise feed-forward."""
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One block (dropout and drop-path are training-only and omitted)."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT returning every token after the final LayerNorm: (B, 1 + grid², width), CLS first."""

    def __init__(
        self,
        image_size: int = 256,
        patch_size: int = 16,
        width: int = 768,
        depth: int = 12,
        heads: int = 12,
        mlp_ratio: float = 4.0,
        eps: float = 1e-6,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(image_size, patch_size, in_chans, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, width))
        self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio, eps) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=eps)
        self._init_weights()

    def _init_weights(self) -> None:
        # ALBEF's init: truncated normal (std 0.02) for embeddings and Linear weights, zero biases, unit LayerNorms.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels`` (B, 3, S, S) → tokens (B, 1 + grid², width)."""
        x = self.patch_embed(pixels)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


def interpolate_pos_embed(pos_embed: torch.Tensor, num_patches: int, num_extra_tokens: int = 1) -> torch.Tensor:
    """Resize a ViT position embedding (1, extra + g², W) to ``num_patches`` grid tokens.

    Same as ALBEF's ``interpolate_pos_embed``: the extra (CLS) rows are kept, the square grid is resized with
    bicubic interpolation (``align_corners=False``). Returned unchanged when the grid already matches."""
    W = pos_embed.shape[-1]
    old = pos_embed.shape[-2] - num_extra_tokens
    old_size, new_size = math.isqrt(old), math.isqrt(num_patches)
    if old_size * old_size != old or new_size * new_size != num_patches:
        raise ValueError(f"position embedding grid is not square: {old} → {num_patches} tokens")
    if old_size == new_size:
        return pos_embed
    extra, grid = pos_embed[:, :num_extra_tokens], pos_embed[:, num_extra_tokens:]
    grid = grid.reshape(-1, old_size, old_size, W).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_size, new_size), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)
    return torch.cat([extra, grid], dim=1)


__all__ = ["Attention", "Block", "Mlp", "PatchEmbed", "VisionTransformer", "interpolate_pos_embed"]
