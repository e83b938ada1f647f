"""RAF: residual attention fusion on CLIP ("ClipResMAAF"), from "Training and challenging models for text-guided
fashion image retrieval" (Dodds, Culpepper, Srivastava 2022, the CFQ paper). Origin: github.com/yahoo/maaf,
``src/maaf/models/clip.py`` (``ClipResMAAF``, ``ImageFeatureExtractor``, ``TextFeatureExtractor``) on top of
``src/maaf/models/composition_models.py`` (``MAAF``) and ``src/maaf/models/transformer.py``.

Towers: CLIP RN50 (ModifiedResNet with attention pool) and CLIP's 12-layer text transformer (77 tokens).

- Image tokens: layer4 (7×7×2048) → 1×1 conv + BN + ReLU → 49 tokens of width d; the attention-pool output
  (1024) → Linear(1024, d, bias=False) → one more token and the image's residual feature. 50 image tokens.
- Text tokens: ``ln_final`` features of every position → Linear(512, d, bias=False) (``out_layer``, initialised by
  the official code from CLIP's ``text_projection``); the residual text feature is that output at the end token,
  index ``attention_mask.sum(1) - 1`` (the official code finds it from the mask too).
- ``maaf`` = MAAF fusion (1 pre-norm block, 8 heads, d 1024, FF 256, final norm) over image ⊕ masked text tokens,
  "rwpool" output: mean of (mean of the 49 layer4 tokens, the attnpool token) and the masked text mean, averaged.
- ``compose = attnpool_proj(img) + out_layer(EOT) + w · maaf``; ``gallery = attnpool_proj(img) + w · maaf(image
  tokens only)``. ``w`` is a fixed config value (``maaf_weight``; the official code keeps it as a non-learned
  tensor, not in the state dict).
- Training multiplied the unit vector by a learned exp(s) (``NormalizationLayer``, a softmax temperature); it does
  not change the ranking, so the exported embedding is the unit vector.

Preprocessing is CLIP's: bicubic resize of the shorter side to 224, centre crop 224, CLIP mean/std.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fine_infer.errors import ConfigError
from fine_infer.models._builder import ZooModel
from fine_infer.models._clip_text import ClipTextTransformer
from fine_infer.models._fusion import (
    NORM_KINDS,
    FusionEncoder,
    fuse_tokens,
    masked_mean,
    pool_image,
    rename_official_encoder_key,
)
from fine_infer.models._registry import register
from fine_infer.models._resnet import ConvProjection, ModifiedResNet
from fine_infer.specs import CLIP_MEAN, CLIP_STD, GraphSpec, ImagePreprocess, TensorSpec, TextPreprocess


@dataclass(frozen=True)
class RAFConfig:
    """Every size of a RAF model. ``vocab_size`` counts our BPE ids (pad 0, start 1, end 2, then CLIP's order)."""

    image_size: int = 224
    vision_layers: tuple[int, ...] = (3, 4, 6, 3)  # CLIP RN50
    vision_width: int = 64
    vision_heads: int = 32  # attention-pool heads (CLIP: width * 32 // 64)
    clip_embed_dim: int = 1024  # CLIP's joint width: attention-pool output
    vocab_size: int = 49409  # CLIP's 49408 tokens + our separate pad id
    context_length: int = 77
    text_width: int = 512
    text_heads: int = 8
    text_layers: int = 12
    embed_dim: int = 1024  # fusion width d = token projections = embedding dim
    num_blocks: int = 1
    num_heads: int = 8
    ff_dim: int = 256
    maaf_weight: float = 0.0067  # fixed residual weight w of the fusion branch
    norm: str = "annotated"
    norm_eps: float = 1e-6
    output: str = "rwpool"
    vocab_file: str | None = None  # CLIP's bpe_simple_vocab_16e6.txt.gz for real CLIP/RAF weights


def paper_config() -> RAFConfig:
    """The CFQ paper's CLIP RN50 residual attention fusion model."""
    return RAFConfig()


def tiny_config() -> RAFConfig:
    """A narrow model for tests and the demo. ``maaf_weight`` is 0.5 (not 0.0067) so the fusion branch shows in
    parity checks at a 1e-4 tolerance."""
    return RAFConfig(
        image_size=64,
        vision_layers=(1, 1, 1, 1),
        vision_width=8,
        vision_heads=4,
        clip_embed_dim=64,
        vocab_size=1024,
        context_length=32,
        text_width=32,
        text_heads=4,
        text_layers=2,
        embed_dim=64,
        num_blocks=1,
        num_heads=4,
        ff_dim=64,
        maaf_weight=0.5,
    )


class RAFImageModel(nn.Module):
    """CLIP's ModifiedResNet (``model``) and the projections of layer4 (``projections["4"]``) and of the attention
    pool (``projections["attnpool"]``) to the fusion width, as the official ``ImageFeatureExtractor``."""

    def __init__(self, config: RAFConfig) -> None:
        super().__init__()
        self.model = ModifiedResNet(
            config.vision_layers, config.clip_embed_dim, config.vision_heads, config.image_size, config.vision_width
        )
        self.projections = nn.ModuleDict(
            {
                "4": ConvProjection(self.model.stage_channels[3], config.embed_dim),
                "attnpool": nn.Linear(config.clip_embed_dim, config.embed_dim, bias=False),
            }
        )

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """``pixels`` → (tokens (B, HW+1, d), attnpool feature (B, d), token count per resolution ``[HW, 1]``)."""
        layer4 = self.model(pixels)[3]
        pooled = self.projections["attnpool"](self.model.attnpool(layer4))
        grid = self.projections["4"](layer4)
        return torch.cat([grid, pooled[:, None]], dim=1), pooled, [grid.shape[1], 1]


class RAFTextModel(ClipTextTransformer):
    """CLIP's text transformer plus ``out_layer`` (Linear(width, d, bias=False)) on every position."""

    def __init__(self, config: RAFConfig) -> None:
        super().__init__(
            config.vocab_size, config.context_length, config.text_width, config.text_layers, config.text_heads
        )
        self.out_layer = nn.Linear(config.text_width, config.embed_dim, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids`` (B, L) → projected token features (B, L, d)."""
        return self.out_layer(super().forward(input_ids))


class RAF(ZooModel):
    """Residual attention fusion on CLIP RN50: ``compose`` (image + text → query), ``gallery`` (image → target)."""

    config: RAFConfig
    graph_methods = {"compose": "compose", "gallery": "gallery"}

    def __init__(self, config: RAFConfig) -> None:
        super().__init__(config)
        _validate(config)
        self.image_model = RAFImageModel(config)
        self.text_model = RAFTextModel(config)
        self.encoder = FusionEncoder(
            config.embed_dim, config.num_blocks, config.num_heads, config.ff_dim, config.norm, config.norm_eps
        )

    # --- forward paths ------------------------------------------------------------------------------------------
    def compose(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Query embedding (B, d), L2-normalised."""
        image_tokens, image_feat, sizes = self.image_model(pixels)
        text_tokens = self.text_model(input_ids)
        # End token = last valid position (the mask, not argmax of ids: our ids do not put the end token highest).
        # torch.maximum, not clamp: an integer clamp exports an INT64 Clip, which TensorRT's parser does not take
        length = attention_mask.sum(dim=1) - 1
        eot = torch.maximum(length, torch.zeros_like(length))
        text_feat = text_tokens.gather(1, eot[:, None, None].expand(-1, 1, text_tokens.shape[2])).squeeze(1)
        fused_image, fused_text = fuse_tokens(self.encoder, image_tokens, text_tokens, attention_mask)
        maaf = 0.5 * (pool_image(fused_image, sizes, self.config.output) + masked_mean(fused_text, attention_mask))
        return F.normalize(image_feat + text_feat + self.config.maaf_weight * maaf, dim=-1)

    def gallery(self, pixels: torch.Tensor) -> torch.Tensor:
        """Target embedding (B, d), L2-normalised: attnpool feature + w · fusion over the image tokens alone."""
        image_tokens, image_feat, sizes = self.image_model(pixels)
        maaf = pool_image(self.encoder(image_tokens, None), sizes, self.config.output)
        return F.normalize(image_feat + self.config.maaf_weight * maaf, dim=-1)

    # --- declarations -------------------------------------------------------------------------------------------
    def graphs(self) -> dict[str, GraphSpec]:
        S, E = self.config.image_size, self.config.embed_dim
        pixels = TensorSpec("pixels", "float32", ("batch", 3, S, S))
        ids = TensorSpec("input_ids", "int64", ("batch", "sequence"))
        mask = TensorSpec("attention_mask", "int64", ("batch", "sequence"))
        emb = TensorSpec("embedding", "float32", ("batch", E))
        return {
            "compose": GraphSpec("compose", "compose", (pixels, ids, mask), (emb,)),
            "gallery": GraphSpec("gallery", "embed_image", (pixels,), (emb,)),
        }

    @property
    def image_preprocess(self) -> ImagePreprocess:
        S = self.config.image_size
        return ImagePreprocess(size=S, crop=S, resize="shorter", interpolation="bicubic", mean=CLIP_MEAN, std=CLIP_STD)

    @property
    def text_preprocess(self) -> TextPreprocess:
        # "longest" padding is exact here: the causal mask keeps padding out of every position up to the end token,
        # and the fusion and the text mean mask it. clean="clip": CLIP's ftfy/HTML/whitespace cleaning and
        # lowercasing, before the tokenizer (every preset: on the catalogue's plain captions it changes nothing).
        return TextPreprocess(
            tokenizer="bpe", max_length=self.config.context_length, padding="longest", pad_id=0, first_word_id=3,
            clean="clip",
        )

    # --- checkpoints --------------------------------------------------------------------------------------------
    def checkpoint_filter(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map a yahoo/maaf ``ClipResMAAF`` state dict to ours; our own layout passes through.

        Drops the aliases the official module registers twice (``clip.*`` = the whole CLIP model, ``model.*`` = the
        encoder) and the training-only metric head (``head.normalization_layer``); renames the encoder and
        ``text_model.model`` → ``text_model.transformer``; permutes the token embedding from CLIP's ids (start 49406,
        end 49407) to ours (pad 0, start 1, end 2, CLIP's id + 3)."""
        state = {k.removeprefix("module."): v for k, v in state.items()}
        if not is_official_layout(state):
            return state
        out = map_official_keys(state)
        key = "text_model.token_embedding.weight"
        if key in out:
            out[key] = clip_to_our_token_rows(out[key])
            if self.config.vocab_file is None:
                warnings.warn(
                    "loading official RAF/CLIP weights with the built-in tokenizer: set vocab_file to CLIP's "
                    "bpe_simple_vocab_16e6.txt.gz so token ids match the weights",
                    stacklevel=3,
                )
        return out


def _validate(config: RAFConfig) -> None:
    if config.image_size % 32:
        raise ConfigError(f"RAF image_size must be a multiple of 32, got {config.image_size}")
    if config.norm not in NORM_KINDS:
        raise ConfigError(f"RAF norm must be one of {NORM_KINDS}, got {config.norm!r}")
    if config.output not in ("rwpool", "mean"):
        raise ConfigError(f"RAF output must be 'rwpool' or 'mean', got {config.output!r}")
    for name, dim, heads in (
        ("embed_dim", config.embed_dim, config.num_heads),
        ("text_width", config.text_width, config.text_heads),
        ("vision_width * 32", config.vision_width * 32, config.vision_heads),
    ):
        if dim % heads:
            raise ConfigError(f"RAF {name} {dim} is not divisible by its {heads} heads")


# --- official layout ----------------------------------------------------------------------------------------------
# CLIP registered whole (clip.*) and the encoder's alias (model.*), and training only: the metric head
# (head.normalization_layer.norm_s, as src/maaf/train.py saves it; normalization_layer.* in older layouts) and losses.
_DROP_PREFIXES = ("clip.", "model.", "head.", "normalization_layer.", "loss.")


def is_official_layout(state: dict[str, torch.Tensor]) -> bool:
    """True for a yahoo/maaf ClipResMAAF state dict."""
    return any(k.startswith(("clip.", "text_model.model.")) or ".self_attn.linears." in k for k in state)


def map_official_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ClipResMAAF keys to ours and drop aliases and training-only tensors."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k.startswith(_DROP_PREFIXES):
            continue
        if k.startswith("text_model.model."):
            k = "text_model.transformer." + k[len("text_model.model."):]
        elif k.startswith("encoder."):
            k = "encoder." + rename_official_encoder_key(k[len("encoder."):])
        out[k] = v
    return out


def clip_to_our_token_rows(weight: torch.Tensor) -> torch.Tensor:
    """CLIP token-embedding rows (V, D) → ours (V + 1, D): pad (CLIP's row 0; padding never reaches a kept
    position), start (CLIP V-2), end (CLIP V-1), then CLIP's ids 0..V-3."""
    V = weight.shape[0]
    rows = torch.cat([torch.tensor([0, V - 2, V - 1]), torch.arange(V - 2)])
    return weight[rows].clone()


def our_to_clip_token_rows(weight: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`clip_to_our_token_rows` (the pad row is dropped)."""
    return torch.cat([weight[3:], weight[1:3]]).clone()


register(
    "raf",
    RAF,
    {"tiny": tiny_config, "paper": paper_config},
    description="Residual attention fusion on CLIP RN50: attnpool + EOT text + w·MAAF(layer4 + attnpool ⊕ text)",
    source="Dodds et al. 2022, CFQ paper (ClipResMAAF, github.com/yahoo/maaf src/maaf/models/clip.py)",
)

__all__ = ["RAF", "RAFConfig", "RAFImageModel", "RAFTextModel", "clip_to_our_token_rows", "our_to_clip_token_rows"]
