"""Triplet embedding model from "Learning Embeddings for Product Visual Search with Triplet Loss and Online
Sampling" (Dodds, Nguyen, Herdade, Culpepper, Kae, Garrigues 2018, arXiv:1810.04652; Yahoo Research). No official
code was published; the model follows the paper's description: an ImageNet-style ResNet-50
trunk, global average pooling, a linear embedding layer and L2 normalisation (dim 256 by default, configurable).

Parameter names: ``backbone.*`` is a torchvision ResNet without ``fc``; ``embedding`` is the linear layer. A
torchvision-layout checkpoint whose ``fc`` is the embedding layer (the usual way such a model is trained: replace
``resnet50().fc`` with ``Linear(2048, dim)``) loads through :meth:`TripletNet.checkpoint_filter`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fine_infer.errors import ConfigError
from fine_infer.models._builder import ZooModel
from fine_infer.models._registry import register
from fine_infer.models._resnet import ResNet
from fine_infer.specs import IMAGENET_MEAN, IMAGENET_STD, GraphSpec, ImagePreprocess, TensorSpec


@dataclass(frozen=True)
class TripletConfig:
    """Every size of the triplet embedding model."""

    image_size: int = 224
    resnet_layers: tuple[int, ...] = (3, 4, 6, 3)  # ResNet-50
    resnet_width: int = 64
    embed_dim: int = 256


def paper_config() -> TripletConfig:
    """ResNet-50 → 256-d."""
    return TripletConfig()


def tiny_config() -> TripletConfig:
    """A narrow model for tests and the demo."""
    return TripletConfig(image_size=64, resnet_layers=(1, 1, 1, 1), resnet_width=8, embed_dim=32)


class TripletNet(ZooModel):
    """ResNet trunk → global average pool → Linear → L2 norm. One graph, ``image``."""

    config: TripletConfig
    graph_methods = {"image": "embed"}

    def __init__(self, config: TripletConfig) -> None:
        super().__init__(config)
        if config.image_size % 32:
            raise ConfigError(f"triplet image_size must be a multiple of 32, got {config.image_size}")
        if config.embed_dim < 1:
            raise ConfigError(f"triplet embed_dim must be positive, got {config.embed_dim}")
        self.backbone = ResNet(config.resnet_layers, config.resnet_width)
        self.embedding = nn.Linear(self.backbone.stage_channels[-1], config.embed_dim)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels`` (B, 3, S, S) → L2-normalised embeddings (B, embed_dim)."""
        features = self.backbone(pixels)[-1].mean(dim=(2, 3))
        return F.normalize(self.embedding(features), dim=-1)

    def graphs(self) -> dict[str, GraphSpec]:
        S, E = self.config.image_size, self.config.embed_dim
        return {
            "image": GraphSpec(
                "image",
                "embed_image",
                (TensorSpec("pixels", "float32", ("batch", 3, S, S)),),
                (TensorSpec("embedding", "float32", ("batch", E)),),
            )
        }

    @property
    def image_preprocess(self) -> ImagePreprocess:
        S = self.config.image_size
        return ImagePreprocess(
            size=S, crop=S, resize="shorter", interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD
        )

    def checkpoint_filter(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Accept a torchvision-layout ResNet (``conv1.*``, ``layer1.*``, …, ``fc.*`` = the embedding layer),
        optionally under ``module.``; our own layout passes through."""
        state = {k.removeprefix("module."): v for k, v in state.items()}
        if "conv1.weight" not in state:
            return state
        out = {}
        for k, v in state.items():
            out[("embedding." + k[3:]) if k.startswith("fc.") else ("backbone." + k)] = v
        return out


register(
    "triplet",
    TripletNet,
    {"tiny": tiny_config, "paper": paper_config},
    description="ResNet-50 → linear → L2 image embedding trained with triplet loss and online sampling",
    source="Dodds et al. 2018, Learning Embeddings for Product Visual Search with Triplet Loss and Online Sampling",
)

__all__ = ["TripletConfig", "TripletNet"]
