"""A plain-PyTorch BERT encoder (text mode only) with the parameter names of ALBEF's ``models/xbert.py``
(salesforce/ALBEF; the same file Fashion-FINE and FashionSAP import as ``models.xbert``), i.e. Hugging Face's
``BertModel`` names, so an official ``text_encoder.*`` state dict loads without renaming.

Layout: ``embeddings`` (``word_embeddings``, ``position_embeddings``, ``token_type_embeddings``, ``LayerNorm``) and
post-norm ``encoder.layer.{i}`` (``attention.self.{query,key,value}``, ``attention.output.{dense,LayerNorm}``,
``intermediate.dense``, ``output.{dense,LayerNorm}``). Only the self-attention layers are built: ALBEF's
``mode='text'`` runs layers ``0 .. fusion_layer-1`` (0–5 for BERT-base), which have no cross-attention; the fusion
layers (6–11, with ``crossattention.*``) are never used to embed text, so they are not part of this module.

The attention mask is applied as xbert does: an additive ``(1 - mask) * -10000`` on the scores, through
:func:`torch.nn.functional.scaled_dot_product_attention`. Token types are all 0 (row 0 of ``token_type_embeddings``)
and positions are absolute (``0 .. L-1``), as in xbert's text mode. GELU is the exact (erf) form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fine_infer.models._lstm_text import lookup

MASK_VALUE = -10000.0  # xbert's get_extended_attention_mask: (1.0 - mask) * -10000.0


def extended_attention_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``attention_mask`` (B, L), 1 = token, 0 = padding → additive mask (B, 1, 1, L) for every head and query."""
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * MASK_VALUE


class BertEmbeddings(nn.Module):
    """Word + absolute position + token-type (type 0) embeddings, then LayerNorm."""

    def __init__(self, vocab_size: int, width: int, max_positions: int, type_vocab_size: int, eps: float) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, width, padding_idx=0)
        self.position_embeddings = nn.Embedding(max_positions, width)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids`` (B, L) → (B, L, width)."""
        # lookup() (index_select), not nn.Embedding's forward: the exporter names F.embedding's value "embedding",
        # which clashes with the graphs' output name. arange over the (dynamic) length: no data-dependent shape.
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = lookup(self.word_embeddings.weight, input_ids) + lookup(self.position_embeddings.weight, positions)[None]
        return self.LayerNorm(x + self.token_type_embeddings.weight[0])


class BertSelfAttention(nn.Module):
    """Separate ``query``/``key``/``value`` projections, scaled dot-product attention with an additive mask."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        return x.reshape(B, L, self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x`` (B, L, W), ``mask`` additive (B, 1, 1, L) → context (B, L, W)."""
        B, L, W = x.shape
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).reshape(B, L, W)


class BertSelfOutput(nn.Module):
    """``dense`` then post-norm residual ``LayerNorm(x + input)``."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Project the attention context and add/normalise with the block input."""
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    """``self`` (the attention) + ``output`` (projection and residual LayerNorm), xbert's names."""

    def __init__(self, width: int, heads: int, eps: float) -> None:
        super().__init__()
        self.self = BertSelfAttention(width, heads)
        self.output = BertSelfOutput(width, eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Self-attention sub-layer with its residual."""
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    """``dense`` (width → intermediate) with exact GELU."""

    def __init__(self, width: int, intermediate: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Expand and activate."""
        return F.gelu(self.dense(x))


class BertOutput(nn.Module):
    """``dense`` (intermediate → width) then ``LayerNorm(x + input)``."""

    def __init__(self, width: int, intermediate: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(intermediate, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Contract and add/normalise with the sub-layer input."""
        return self.LayerNorm(self.dense(x) + residual)


class BertLayer(nn.Module):
    """One post-norm BERT layer without cross-attention (xbert layers below ``fusion_layer``)."""

    def __init__(self, width: int, heads: int, intermediate: int, eps: float) -> None:
        super().__init__()
        self.attention = BertAttention(width, heads, eps)
        self.intermediate = BertIntermediate(width, intermediate)
        self.output = BertOutput(width, intermediate, eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attention then feed-forward, each with its residual LayerNorm."""
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    """The stack ``layer.{i}``."""

    def __init__(self, layers: int, width: int, heads: int, intermediate: int, eps: float) -> None:
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(width, heads, intermediate, eps) for _ in range(layers)])

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Run every layer with the same additive mask."""
        for layer in self.layer:
            x = layer(x, mask)
        return x


class BertModel(nn.Module):
    """BERT text encoder (no pooler, as ``BertModel(add_pooling_layer=False)``): ids + mask → last hidden states."""

    def __init__(
        self,
        vocab_size: int = 30522,
        width: int = 768,
        layers: int = 6,
        heads: int = 12,
        intermediate: int = 3072,
        max_positions: int = 512,
        type_vocab_size: int = 2,
        eps: float = 1e-12,
    ) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(vocab_size, width, max_positions, type_vocab_size, eps)
        self.encoder = BertEncoder(layers, width, heads, intermediate, eps)
        self._init_weights()

    def _init_weights(self) -> None:
        # BertPreTrainedModel._init_weights: N(0, 0.02) for Linear/Embedding weights, zero biases, unit LayerNorms.
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``input_ids`` and ``attention_mask`` (B, L) int → hidden states (B, L, width). Padded keys are masked in
        every layer; padded positions still get (unused or pooled) outputs, as in the original."""
        x = self.embeddings(input_ids)
        return self.encoder(x, extended_attention_mask(attention_mask, x.dtype))


__all__ = ["BertEmbeddings", "BertEncoder", "BertLayer", "BertModel", "MASK_VALUE", "extended_attention_mask"]
