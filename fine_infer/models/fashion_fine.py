"""Fashion-FINE: "Integration of global and local representations for fine-grained cross-modal alignment"
(Jin, Choi, Noh, Han; ECCV 2024). Origin: github.com/Seun9wan/Fashion-FINE, ``models/model_retrieval.py``
(class ``FashionFINE``) and the inference path of ``retrieval.py`` (``evaluation``), on top of ALBEF's
``models/vit.py`` and ``models/xbert.py`` (salesforce/ALBEF) and FashionSAP's data pipeline (hssip/FashionSAP).

Towers (the ALBEF variant; the repo's ``FashionFINE_BLIP`` variant has no ``combine`` layers and is not this arch):

- ``visual_encoder``: ViT-B/16 at 256×256 (CLS + 256 patch tokens), pre-norm, LayerNorm eps 1e-6.
- ``text_encoder``: BERT-base in xbert's ``mode='text'``: layers 0–5 (``fusion_layer`` = 6), post-norm, eps 1e-12.
- MAA (modality-agnostic adapter), shared by both modalities: ``att_layer_v`` (Linear H→H) and ``W_v`` (H×1).
  ``a = softmax_tokens(tanh(att_layer_v(x)) @ W_v)``, ``local = Σ a·x`` over ``x = tokens[:, 1:]`` (image) or
  ``tokens[:, 2:]`` (text: skips [CLS] and the token after it — a category-sign token such as ``[tops_sign]`` in the
  training data). The official softmax runs over every text position, padding included.
- ``g = norm(combine(proj(CLS)))``, ``l = norm(combine(proj(local)))``, ``emb = norm((1 − r)·g + r·l)`` with
  ``vision_proj``/``text_proj`` (768→256) and ``combine_vision_proj``/``combine_text_proj`` (256→256);
  r = ``img_patch_ratio`` 0.05 and ``text_patch_ratio`` 0.25 (``retrieval.py`` defaults).

The whole adapter (pooling, projections, integration, normalisation) runs through
:func:`fine_infer.kernels.patch_pool_adapter`, so a fused kernel can replace it.

Text: ``tokenizer(text, padding='max_length', truncation=True, max_length=180)`` in ``retrieval.py``; since the
unmasked pooler averages over padding, embeddings depend on the padded length and the tokenizer must pad to 180.
``mask_text_padding=True`` restricts the pooler to real tokens (not the paper; changes the embeddings).
The texts it embeds (queries for text→image, gallery for image→text alike) are
``"the image description is " + pre_caption(caption)`` (``dataset/fashiongen_dataset.py``; ``pre_caption`` of
``dataset/utils.py`` with no word limit), and the tokenizer has the nine category signs (``[tops_sign]`` …) added as
special tokens: the paper preset's text preprocess names the cleaning and the template (``text_clean``,
``text_template``), so raw query text gets the official ids, and with the official ``vocab.txt`` each sign is one
token (:data:`fine_infer.tokenization.FASHION_SIGN_TOKENS`). The tiny preset, trained on the catalogue's raw captions,
has neither.
Images: resized straight to 256×256 (bicubic, no crop), CLIP mean/std.

Parameter names mirror the official module, so an official checkpoint loads after dropping training-only
tensors (see :meth:`FashionFine.checkpoint_filter`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from fine_infer import kernels
from fine_infer.errors import CheckpointError, ConfigError
from fine_infer.models._bert import BertModel
from fine_infer.models._builder import ZooModel
from fine_infer.models._registry import register
from fine_infer.models._vit import VisionTransformer, interpolate_pos_embed
from fine_infer.specs import CLIP_MEAN, CLIP_STD, GraphSpec, ImagePreprocess, TensorSpec, TextPreprocess

IMAGE_POOL_START = 1  # patch tokens follow the CLS token
TEXT_POOL_START = 2  # the official code pools text_embeds[:, 2:], skipping [CLS] and the category-sign slot


@dataclass(frozen=True)
class FashionFineConfig:
    """Every size of a Fashion-FINE model. Defaults are the paper's (see :func:`paper_config`)."""

    image_size: int = 256
    patch_size: int = 16
    vision_width: int = 768
    vision_depth: int = 12
    vision_heads: int = 12
    vision_mlp_ratio: float = 4.0
    vision_eps: float = 1e-6
    text_width: int = 768
    text_layers: int = 6  # xbert text mode: layers below fusion_layer (6 of BERT-base's 12)
    text_heads: int = 12
    text_intermediate: int = 3072
    text_eps: float = 1e-12
    vocab_size: int = 30522
    max_text_len: int = 180  # tokenizer max_length (retrieval.py --max_word_num)
    max_positions: int = 512  # BERT's position-embedding table
    type_vocab_size: int = 2
    embed_dim: int = 256
    r_img: float = 0.05  # img_patch_ratio: weight of the pooled local feature for images
    r_text: float = 0.25  # text_patch_ratio
    mask_text_padding: bool = False  # the paper pools over padding too; True restricts pooling to real tokens
    vocab_file: str | None = None  # BERT vocab.txt (FashionSAP's fashion_annotation/vocab.txt for real weights)
    # The official evaluation's text convention (dataset/fashiongen_dataset.py, the retrieval texts): every text is
    # pre_caption-cleaned, then put after "the image description is " (None: raw text, as the tiny preset trained)
    text_clean: str | None = "pre_caption"
    text_template: str | None = "the image description is {text}"


def paper_config() -> FashionFineConfig:
    """ViT-B/16 at 256 px, BERT-base text mode (6 layers), 256-d embeddings, r_img 0.05, r_text 0.25."""
    return FashionFineConfig()


def tiny_config() -> FashionFineConfig:
    """A narrow model for tests and the demo (milliseconds per batch on a CPU)."""
    return FashionFineConfig(
        image_size=64,
        patch_size=16,
        vision_width=64,
        vision_depth=2,
        vision_heads=2,
        text_width=64,
        text_layers=2,
        text_heads=2,
        text_intermediate=128,
        vocab_size=1024,
        max_text_len=32,
        max_positions=64,
        embed_dim=32,
        text_clean=None,  # trained on the catalogue's raw captions (fine_infer.tools.train): no template, no cleaning
        text_template=None,
    )


class FashionFine(ZooModel):
    """Fashion-FINE dual encoder: ``image`` (pixels → embedding) and ``text`` (ids, mask → embedding) graphs."""

    config: FashionFineConfig
    graph_methods = {"image": "embed_image", "text": "embed_text"}

    def __init__(self, config: FashionFineConfig) -> None:
        super().__init__(config)
        _validate(config)
        c = config
        self.visual_encoder = VisionTransformer(
            c.image_size, c.patch_size, c.vision_width, c.vision_depth, c.vision_heads, c.vision_mlp_ratio, c.vision_eps
        )
        self.text_encoder = BertModel(
            c.vocab_size, c.text_width, c.text_layers, c.text_heads, c.text_intermediate, c.max_positions,
            c.type_vocab_size, c.text_eps,
        )
        self.vision_proj = nn.Linear(c.vision_width, c.embed_dim)
        self.text_proj = nn.Linear(c.text_width, c.embed_dim)
        self.combine_vision_proj = nn.Linear(c.embed_dim, c.embed_dim)
        self.combine_text_proj = nn.Linear(c.embed_dim, c.embed_dim)
        # The MAA: one additive-attention scorer shared by both modalities (official names W_v, att_layer_v).
        self.att_layer_v = nn.Linear(c.text_width, c.text_width)
        self.W_v = nn.Parameter(torch.empty(c.text_width, 1))
        nn.init.trunc_normal_(self.W_v, std=0.02)
        nn.init.trunc_normal_(self.att_layer_v.weight, std=0.02)
        nn.init.zeros_(self.att_layer_v.bias)

    # --- forward paths ------------------------------------------------------------------------------------------
    def _adapter(self, tokens: torch.Tensor, mask: torch.Tensor | None, proj: nn.Linear, combine: nn.Linear,
                 r: float, pool_start: int) -> torch.Tensor:
        """Encoder tokens → embedding through the (replaceable) fused-adapter entry point, shared MAA weights."""
        return kernels.patch_pool_adapter(
            tokens, mask, self.att_layer_v.weight, self.att_layer_v.bias, self.W_v.squeeze(-1),
            proj.weight, proj.bias, combine.weight, combine.bias, r, pool_start,
        )

    def embed_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels`` (B, 3, S, S), normalised → L2-normalised embeddings (B, embed_dim)."""
        tokens = self.visual_encoder(pixels)
        return self._adapter(
            tokens, None, self.vision_proj, self.combine_vision_proj, self.config.r_img, IMAGE_POOL_START
        )

    def embed_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``input_ids``/``attention_mask`` (B, L) int64 → L2-normalised embeddings (B, embed_dim).

        BERT always honours the mask; the MAA pooler ignores it (pools over padding) unless
        ``config.mask_text_padding``, as in the paper, so pad texts to ``max_text_len`` (the text preprocess does)."""
        tokens = self.text_encoder(input_ids, attention_mask)
        mask = attention_mask.to(torch.bool) if self.config.mask_text_padding else None
        return self._adapter(
            tokens, mask, self.text_proj, self.combine_text_proj, self.config.r_text, TEXT_POOL_START
        )

    # --- declarations -------------------------------------------------------------------------------------------
    def graphs(self) -> dict[str, GraphSpec]:
        """``image`` (task embed_image) and ``text`` (task embed_text), both producing ``embedding``."""
        S, E = self.config.image_size, self.config.embed_dim
        emb = TensorSpec("embedding", "float32", ("batch", E))
        return {
            "image": GraphSpec("image", "embed_image", (TensorSpec("pixels", "float32", ("batch", 3, S, S)),), (emb,)),
            "text": GraphSpec(
                "text",
                "embed_text",
                (
                    TensorSpec("input_ids", "int64", ("batch", "sequence")),
                    TensorSpec("attention_mask", "int64", ("batch", "sequence")),
                ),
                (emb,),
            ),
        }

    @property
    def image_preprocess(self) -> ImagePreprocess:
        """Straight bicubic resize to S×S (no crop) and CLIP mean/std, as the official transforms."""
        S = self.config.image_size
        return ImagePreprocess(size=S, crop=S, resize="exact", interpolation="bicubic", mean=CLIP_MEAN, std=CLIP_STD)

    @property
    def text_preprocess(self) -> TextPreprocess:
        """BERT WordPiece, padded to ``max_text_len`` (the unmasked pooler depends on the padded length), with the
        official cleaning and template where the config names them (the paper preset)."""
        c = self.config
        return TextPreprocess(
            tokenizer="wordpiece", max_length=c.max_text_len, padding="max_length", pad_id=0, first_word_id=5,
            clean=c.text_clean, template=c.text_template,
        )

    # --- checkpoints --------------------------------------------------------------------------------------------
    def checkpoint_filter(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map an official Fashion-FINE (ALBEF-layout) state dict onto this module; our own layout passes through.

        Drops momentum copies (``*_m.*``), queues and their pointers, ``temp``, ``itm_head``, xbert's
        ``position_ids`` buffer, MLM heads and every BERT layer at or beyond ``text_layers`` (the fusion layers with
        cross-attention, unused in text mode); strips ``module.`` and ``text_encoder.bert.`` (pre-training layout);
        resizes ``visual_encoder.pos_embed`` (bicubic, as ALBEF) when the checkpoint's grid differs from ours."""
        out: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            k = key.removeprefix("module.")
            top = k.split(".", 1)[0]
            if top.endswith("_m") or "queue" in top or top in _DROP_TOP or k.startswith(_DROP_PREFIXES):
                continue
            if k.startswith("text_encoder.bert."):
                k = "text_encoder." + k[len("text_encoder.bert."):]
            if k == "text_encoder.embeddings.position_ids":
                continue
            layer = _TEXT_LAYER.match(k)
            if layer and int(layer.group(1)) >= self.config.text_layers:
                continue
            out[k] = value
        key = "visual_encoder.pos_embed"
        if key in out and out[key].shape != self.visual_encoder.pos_embed.shape:
            try:
                out[key] = interpolate_pos_embed(out[key], self.visual_encoder.patch_embed.num_patches)
            except ValueError as exc:
                raise CheckpointError(f"cannot resize {key} {tuple(out[key].shape)}: {exc}") from None
        return out


_DROP_TOP = {"temp", "itm_head"}  # contrastive temperature and image-text matching head: training only
_DROP_PREFIXES = ("text_encoder.cls.", "text_encoder.pooler.", "text_encoder.bert.pooler.")
_TEXT_LAYER = re.compile(r"text_encoder\.encoder\.layer\.(\d+)\.")


def _validate(c: FashionFineConfig) -> None:
    if c.image_size % c.patch_size:
        raise ConfigError(f"Fashion-FINE image_size {c.image_size} is not a multiple of patch_size {c.patch_size}")
    if c.vision_width != c.text_width:
        raise ConfigError(
            f"Fashion-FINE shares one MAA pooler between towers: vision_width ({c.vision_width}) must equal "
            f"text_width ({c.text_width})"
        )
    towers = (("vision_width", c.vision_width, c.vision_heads), ("text_width", c.text_width, c.text_heads))
    for name, dim, heads in towers:
        if heads < 1 or dim % heads:
            raise ConfigError(f"Fashion-FINE {name} {dim} is not divisible by its {heads} heads")
    if c.max_text_len > c.max_positions:
        raise ConfigError(f"Fashion-FINE max_text_len {c.max_text_len} exceeds max_positions {c.max_positions}")
    if c.max_text_len <= TEXT_POOL_START:
        raise ConfigError(f"Fashion-FINE max_text_len must exceed {TEXT_POOL_START} (tokens before the pooled span)")
    for name, r in (("r_img", c.r_img), ("r_text", c.r_text)):
        if not 0.0 <= r <= 1.0:
            raise ConfigError(f"Fashion-FINE {name} must be in [0, 1], got {r}")
    if min(c.vision_depth, c.text_layers, c.embed_dim, c.vocab_size) < 1:
        raise ConfigError("Fashion-FINE depths, embed_dim and vocab_size must be positive")


register(
    "fashion-fine",
    FashionFine,
    {"tiny": tiny_config, "paper": paper_config},
    description="ViT-B/16 + BERT (text mode) dual encoder with a shared MAA pooler integrating global and local tokens",
    source="Jin et al., ECCV 2024, Fashion-FINE (github.com/Seun9wan/Fashion-FINE models/model_retrieval.py)",
)

__all__ = ["FashionFine", "FashionFineConfig", "paper_config", "tiny_config"]
