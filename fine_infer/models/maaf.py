"""MAAF: Modality-Agnostic Attention Fusion for visual search with text feedback (Dodds et al. 2020,
arXiv:2007.00145). Origin: github.com/yahoo/maaf (2020 code in ``models/``, 2021 refactor in ``src/maaf/models/``).

Query (``compose``): a ResNet-50's layer3 (14×14) and layer4 (7×7) maps each go through a 1×1 conv + BN + ReLU to
512-d → 245 image tokens; an LSTM over word embeddings gives per-word features, then dropout + Linear → 512-d text
tokens. Image ⊕ text tokens (key-padding mask over the text) run through 2 pre-norm transformer blocks (8 heads,
FF 128, Annotated-Transformer LayerNorm, final norm, no positional encoding). Output "rwpool": the fused image tokens
are averaged per resolution, then across resolutions; the fused text tokens are averaged over valid words; the
embedding is the mean of the two. Target (``gallery``): the same blocks over the image tokens alone, rwpool.
Training scaled the unit vector by a learned exp(s) (``NormalizationLayer``); it does not change the ranking, so the
exported embedding is the unit vector.

Defaults follow the 2020 paper's FashionIQ script (``experiment_scripts/old_scripts/fashioniq.sh``:
``--att_layer_spec=34 --number_attention_blocks=2 --width_per_attention_block=128 --resolutionwise_pool
--sequence_concat_include_text --sequence_concat_img_through_attn``) and evaluation preprocessing
(``datasets/datasets.py``: Resize(224) bilinear + CenterCrop(224), ImageNet mean/std).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fine_infer.errors import CheckpointError, ConfigError
from fine_infer.models._builder import ZooModel
from fine_infer.models._fusion import (
    NORM_KINDS,
    FusionEncoder,
    fuse_tokens,
    masked_mean,
    pool_image,
    rename_official_encoder_key,
)
from fine_infer.models._lstm_text import LSTMTextEncoder
from fine_infer.models._registry import register
from fine_infer.models._resnet import ConvProjection, ResNet
from fine_infer.specs import IMAGENET_MEAN, IMAGENET_STD, GraphSpec, ImagePreprocess, TensorSpec, TextPreprocess


@dataclass(frozen=True)
class MAAFConfig:
    """Every size of a MAAF model. ``vocab_size`` counts our word ids (``<pad>`` 0, ``<unk>`` 1, then the words)."""

    image_size: int = 224
    resnet_layers: tuple[int, ...] = (3, 4, 6, 3)  # ResNet-50
    resnet_width: int = 64
    feature_layers: tuple[int, ...] = (3, 4)  # ResNet stages projected to tokens (official att_layer_spec "34")
    embed_dim: int = 512  # fusion width d = projection width = text token width = embedding dim
    vocab_size: int = 8192  # placeholder: set to the size of the vocabulary shipped with the weights
    word_embed_dim: int = 512
    lstm_hidden_dim: int = 512
    lstm_layers: int = 1
    max_text_length: int = 128  # the 2021 code's MAX_TOKENS
    num_blocks: int = 2
    num_heads: int = 8
    ff_dim: int = 128
    norm: str = "annotated"  # "annotated" = official LayerNorm (unbiased std, eps on std); or "layernorm"
    norm_eps: float = 1e-6
    output: str = "rwpool"  # or "mean" (the official "simple_pool")
    vocab_file: str | None = None  # words, one per line; for official checkpoints line i = official word id i


def paper_config() -> MAAFConfig:
    """The 2020 paper's FashionIQ model."""
    return MAAFConfig()


def tiny_config() -> MAAFConfig:
    """A narrow model for tests and the demo (well under a second per batch on a CPU)."""
    return MAAFConfig(
        image_size=64,
        resnet_layers=(1, 1, 1, 1),
        resnet_width=8,
        embed_dim=32,
        vocab_size=1024,
        word_embed_dim=32,
        lstm_hidden_dim=32,
        max_text_length=24,
        num_blocks=2,
        num_heads=4,
        ff_dim=64,
    )


class MAAFImageModel(nn.Module):
    """ResNet trunk plus one :class:`ConvProjection` per feature layer (``projections["3"]``, ``["4"]``)."""

    def __init__(self, config: MAAFConfig) -> None:
        super().__init__()
        self.feature_layers = tuple(int(i) for i in config.feature_layers)
        self.model = ResNet(config.resnet_layers, config.resnet_width, num_stages=max(self.feature_layers))
        self.projections = nn.ModuleDict(
            {str(i): ConvProjection(self.model.stage_channels[i - 1], config.embed_dim) for i in self.feature_layers}
        )

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """``pixels`` (B, 3, S, S) → tokens (B, N, d) and the token count of each resolution (static ints)."""
        feats = self.model(pixels)
        tokens = [self.projections[str(i)](feats[i - 1]) for i in self.feature_layers]
        return torch.cat(tokens, dim=1), [t.shape[1] for t in tokens]


class MAAF(ZooModel):
    """The MAAF composition model: ``compose`` (image + text → query) and ``gallery`` (image → target)."""

    config: MAAFConfig
    graph_methods = {"compose": "compose", "gallery": "gallery"}

    def __init__(self, config: MAAFConfig) -> None:
        super().__init__(config)
        _validate(config)
        self.image_model = MAAFImageModel(config)
        self.text_model = LSTMTextEncoder(
            config.vocab_size, config.word_embed_dim, config.lstm_hidden_dim, config.embed_dim, config.lstm_layers
        )
        self.encoder = FusionEncoder(
            config.embed_dim, config.num_blocks, config.num_heads, config.ff_dim, config.norm, config.norm_eps
        )

    # --- forward paths ------------------------------------------------------------------------------------------
    def compose(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Query embedding (B, d), L2-normalised, of reference images modified by texts."""
        image_tokens, sizes = self.image_model(pixels)
        text_tokens = self.text_model(input_ids)
        fused_image, fused_text = fuse_tokens(self.encoder, image_tokens, text_tokens, attention_mask)
        pooled = 0.5 * (pool_image(fused_image, sizes, self.config.output) + masked_mean(fused_text, attention_mask))
        return F.normalize(pooled, dim=-1)

    def gallery(self, pixels: torch.Tensor) -> torch.Tensor:
        """Target embedding (B, d), L2-normalised: the fusion blocks over the image tokens alone."""
        image_tokens, sizes = self.image_model(pixels)
        return F.normalize(pool_image(self.encoder(image_tokens, None), sizes, self.config.output), dim=-1)

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
        return ImagePreprocess(
            size=S, crop=S, resize="shorter", interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD
        )

    @property
    def text_preprocess(self) -> TextPreprocess:
        return TextPreprocess(
            tokenizer="word", max_length=self.config.max_text_length, padding="longest", pad_id=0, first_word_id=2
        )

    # --- checkpoints --------------------------------------------------------------------------------------------
    def checkpoint_filter(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map yahoo/maaf checkpoints (2020 ``img_model./composer.`` or 2021 ``image_model./encoder.`` layouts) to
        ours; our own layout passes through. The official word ids follow the training texts' order, so mapping the
        embedding needs ``config.vocab_file`` listing the official words by id (line 0 ``<UNK>``)."""
        state = {k.removeprefix("module."): v for k, v in state.items()}
        if not is_official_layout(state):
            return state
        out = map_official_keys(state)
        key = "text_model.embedding_layer.weight"
        if key in out:
            if self.config.vocab_file is None:
                raise CheckpointError(
                    "this is an official yahoo/maaf checkpoint: its word ids follow the training vocabulary, so set "
                    "vocab_file to that vocabulary (one word per line, in id order, line 0 '<UNK>')"
                )
            out[key] = permute_official_embedding(out[key], self.build_tokenizer(), self.config.vocab_file)
        return out


def _validate(config: MAAFConfig) -> None:
    if config.image_size % 32:
        raise ConfigError(f"MAAF image_size must be a multiple of 32, got {config.image_size}")
    layers = tuple(config.feature_layers)
    if not layers or any(i not in (1, 2, 3, 4) for i in layers) or list(layers) != sorted(set(layers)):
        raise ConfigError(f"MAAF feature_layers must be increasing ResNet stages in 1..4, got {layers}")
    if config.norm not in NORM_KINDS:
        raise ConfigError(f"MAAF norm must be one of {NORM_KINDS}, got {config.norm!r}")
    if config.output not in ("rwpool", "mean"):
        raise ConfigError(f"MAAF output must be 'rwpool' or 'mean', got {config.output!r}")
    if config.embed_dim % config.num_heads:
        raise ConfigError(f"MAAF embed_dim {config.embed_dim} is not divisible by num_heads {config.num_heads}")


# --- official layouts -------------------------------------------------------------------------------------------------
# Training-only or duplicate: the metric head's scale (2020: normalization_layer, 2021: head.*), losses, the encoder's
# aliases (composer.m, model), the unused fc head, and the 2020 composer's own copy of the feed-forward block
# (composer.ff, deep-copied into every layer: the layers' copies are the ones that run).
_DROP_PREFIXES = ("normalization_layer.", "head.", "loss.", "soft_triplet_loss.", "composer.m.", "composer.ff.",
                  "model.", "image_model.fc.", "image_model.model.fc.", "img_model.fc.", "img_model.model.fc.")


def is_official_layout(state: dict[str, torch.Tensor]) -> bool:
    """True for a yahoo/maaf state dict (either code generation)."""
    return any(k.startswith(("img_model.", "composer.")) or ".self_attn.linears." in k for k in state)


def map_official_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename yahoo/maaf keys to ours and drop the duplicates (``composer.m``/``model`` alias the encoder), the 2020
    composer's unused ``composer.ff`` block, the unused ``fc`` head and the training-only metric head
    (``normalization_layer`` in 2020, ``head.normalization_layer`` in 2021)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k.startswith(_DROP_PREFIXES):
            continue
        k = k.replace("img_model.model.", "image_model.model.", 1)
        k = re.sub(r"^img_model\.l(\d)_conv_proj\.", r"image_model.projections.\1.", k)
        k = k.replace("composer.encoder.", "encoder.", 1)
        if k.startswith("encoder."):
            k = "encoder." + rename_official_encoder_key(k[len("encoder."):])
        out[k] = v
    return out


def permute_official_embedding(weight: torch.Tensor, tokenizer, vocab_file: str | Path) -> torch.Tensor:
    """Reorder the official word-embedding rows (official id = line index of ``vocab_file``, id 0 = ``<UNK>``, which
    the official code also pads with) into our ids (``<pad>`` 0, ``<unk>`` 1, then the tokenizer's word order)."""
    words = [w.lower() for w in Path(vocab_file).read_text(encoding="utf-8").split()]
    if len(words) != weight.shape[0]:
        raise CheckpointError(
            f"vocab_file {vocab_file} lists {len(words)} words but the official embedding has {weight.shape[0]} rows"
        )
    official = {w: i for i, w in enumerate(words)}
    rows = [0] * tokenizer.get_vocab_size()
    for word, our_id in tokenizer.get_vocab().items():
        rows[our_id] = official.get(word, 0)  # <pad> and <unk> take the official <UNK> row
    return weight[torch.tensor(rows)].clone()


register(
    "maaf",
    MAAF,
    {"tiny": tiny_config, "paper": paper_config},
    description="MAAF: ResNet-50 layer3+4 tokens ⊕ LSTM word tokens through attention fusion; compose + gallery",
    source="Dodds et al. 2020, Modality-Agnostic Attention Fusion for visual search with text feedback "
    "(github.com/yahoo/maaf)",
)

__all__ = [
    "MAAF",
    "MAAFConfig",
    "MAAFImageModel",
    "is_official_layout",
    "map_official_keys",
    "permute_official_embedding",
]
