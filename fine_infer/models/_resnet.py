"""Plain-torch ResNet trunks shared by the MAAF, RAF and triplet archs (torchvision/open_clip do not import here).

- :class:`ResNet`: torchvision's ResNet-v1.5 bottleneck layout (7×7 stem, max-pool, stride on the 3×3 conv), with
  configurable depth per stage and base width, so ``layers=(3, 4, 6, 3), width=64`` is ResNet-50 and a tiny variant
  is ``layers=(1, 1, 1, 1), width=8``. Submodule names match torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``,
  ``layer1.0.downsample.0``, …) so torchvision checkpoints load after a prefix rename.
- :class:`ModifiedResNet`: CLIP's ResNet (openai/CLIP ``clip/model.py``): 3-conv stem with an average pool,
  anti-aliased strided blocks (avg-pool before the stride-1 conv) and an attention pool (:class:`AttentionPool2d`)
  in place of global average pooling. Names match CLIP's ``visual.*`` keys.
- :class:`ConvProjection`: yahoo/maaf's 1×1 projection of a feature map to fusion tokens (conv without bias, BN with
  eps 1e-3, ReLU), returning ``(B, H*W, C)`` tokens.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


# --------------------------------------------------------------------------------------------------------------------
# torchvision-style ResNet (MAAF's and the triplet model's trunk)
# --------------------------------------------------------------------------------------------------------------------
class Bottleneck(nn.Module):
    """ResNet-v1.5 bottleneck (torchvision): 1×1 → 3×3 (carries the stride) → 1×1 ×4, projection shortcut."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


class ResNet(nn.Module):
    """A ResNet trunk without its classifier; :meth:`forward` returns the outputs of the four stages.

    ``layers`` is the number of bottleneck blocks per stage, ``width`` the planes of stage 1 (64 for ResNet-50);
    stage ``i`` outputs ``width * 2**(i-1) * 4`` channels at stride ``2**(i+1)``. ``num_stages`` < 4 builds only
    the first stages (yahoo/maaf deletes the layers after the last one it reads).
    """

    def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), width: int = 64, num_stages: int = 4) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"ResNet needs 4 stages, got layers={tuple(layers)}")
        if not 1 <= num_stages <= 4:
            raise ValueError(f"num_stages must be 1..4, got {num_stages}")
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = width
        self.stage_channels: list[int] = []
        for i, n in enumerate(layers[:num_stages]):
            planes = width * 2**i
            blocks = []
            for j in range(n):
                blocks.append(Bottleneck(inplanes, planes, stride=2 if (i > 0 and j == 0) else 1))
                inplanes = planes * Bottleneck.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.stage_channels.append(inplanes)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``x`` (B, 3, H, W) → the feature map of each built stage (``[layer1, …, layer4]``)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for i in range(1, len(self.stage_channels) + 1):
            x = getattr(self, f"layer{i}")(x)
            outs.append(x)
        return outs


# --------------------------------------------------------------------------------------------------------------------
# CLIP's ModifiedResNet (RAF's image tower)
# --------------------------------------------------------------------------------------------------------------------
class ClipBottleneck(nn.Module):
    """CLIP's bottleneck: all convs stride 1, an avg-pool after the 3×3 conv when strided (anti-aliasing), and an
    avg-pool → 1×1 conv → BN shortcut (keys ``downsample.0``/``downsample.1``; the pool is ``downsample.-1``)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool: nn.Module = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride > 1 or inplanes != out:
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride)),
                        ("0", nn.Conv2d(inplanes, out, 1, bias=False)),
                        ("1", nn.BatchNorm2d(out)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu1(self.bn1(self.conv1(x)))
        y = self.relu2(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(self.avgpool(y)))
        return self.relu3(y + identity)


class AttentionPool2d(nn.Module):
    """CLIP's QKV attention pool: the mean token (plus a learned position embedding) attends over all positions.

    Only the mean token's query is computed: CLIP computes every query and keeps token 0, which is the same value.
    """

    def __init__(self, spacial_dim: int, embed_dim: int, num_heads: int, output_dim: int | None = None) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spacial_dim**2 + 1, embed_dim) / embed_dim**0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim or embed_dim)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, C, H, W) with H*W = spacial_dim² → (B, output_dim)."""
        B, C = x.shape[0], x.shape[1]
        x = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding[None]
        h, d = self.num_heads, C // self.num_heads
        q = self.q_proj(x[:, :1]).reshape(B, 1, h, d).transpose(1, 2)
        k = self.k_proj(x).reshape(B, -1, h, d).transpose(1, 2)
        v = self.v_proj(x).reshape(B, -1, h, d).transpose(1, 2)
        attn = torch.softmax((q * d**-0.5) @ k.transpose(-1, -2), dim=-1)  # (B, h, 1, HW+1)
        out = (attn @ v).transpose(1, 2).reshape(B, C)
        return self.c_proj(out)


class ModifiedResNet(nn.Module):
    """CLIP's ResNet image tower. :meth:`forward` returns the four stage outputs; :attr:`attnpool` pools layer4.

    RN50 is ``layers=(3, 4, 6, 3), width=64, heads=32, output_dim=1024, input_resolution=224``.
    """

    def __init__(
        self, layers: Sequence[int], output_dim: int, heads: int, input_resolution: int = 224, width: int = 64
    ) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"ModifiedResNet needs 4 stages, got layers={tuple(layers)}")
        if input_resolution % 32:
            raise ValueError(f"input_resolution must be a multiple of 32, got {input_resolution}")
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        self.relu = nn.ReLU(inplace=True)
        inplanes = width
        self.stage_channels: list[int] = []
        for i, n in enumerate(layers):
            planes = width * 2**i
            blocks = [ClipBottleneck(inplanes, planes, stride=1 if i == 0 else 2)]
            inplanes = planes * ClipBottleneck.expansion
            blocks += [ClipBottleneck(inplanes, planes) for _ in range(1, n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.stage_channels.append(inplanes)
        self.attnpool = AttentionPool2d(input_resolution // 32, width * 32, heads, output_dim)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``x`` (B, 3, R, R) → ``[layer1, layer2, layer3, layer4]`` feature maps (attention pool not applied)."""
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            x = self.relu(bn(conv(x)))
        x = self.avgpool(x)
        outs = []
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            outs.append(x)
        return outs


# --------------------------------------------------------------------------------------------------------------------
# yahoo/maaf projection of feature maps to fusion tokens
# --------------------------------------------------------------------------------------------------------------------
class ConvProjection(nn.Module):
    """1×1 conv (no bias) → BatchNorm (eps 1e-3) → ReLU, flattened to tokens ``(B, H*W, out_channels)``.

    Mirrors ``ConvProjection`` in yahoo/maaf ``src/maaf/models/image_model.py`` (``BasicConv2d`` in the 2020 code).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        return x.flatten(2).transpose(1, 2)


__all__ = [
    "AttentionPool2d",
    "Bottleneck",
    "ClipBottleneck",
    "ConvProjection",
    "ModifiedResNet",
    "ResNet",
]
