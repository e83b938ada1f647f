"""Multi-head attribute classifier after "Deep Architectures for Face Attributes" (Baumgartner & Culpepper, ACCV 2016
workshops, arXiv:1609.09018; Yahoo Research).

What the paper says (its abstract; the full text was not reachable here): one CNN is trained for identity, then
fine-tuned per attribute (age, gender, ethnicity, emotion), trying "several different depths for each attribute";
age and emotion are predicted better when they branch from *earlier* layers, and the chosen sharing pattern needs
"only 1 G flops to produce all predictions". No code or weights were published.

This module is our own plain-torch design in that spirit, not a reproduction of the paper's layers:

- a shared trunk of VGG-style stages (``conv3×3 stride 2 → BN → ReLU``, then ``depth − 1`` ×
  ``conv3×3 → BN → ReLU``);
  stage ``i`` outputs ``trunk_widths[i]`` channels at stride ``2**(i+1)``;
- per head, a branch off the output of trunk stage ``branch`` (configurable per head): ``conv3×3 → BN → ReLU →
  global average pool → Linear`` to that head's logits. Only the stages up to the deepest branch are computed.

Assumptions of the ``paper`` preset (stated because the paper's tables were not available): a 224×224 face crop;
"flops" counted as multiply-accumulates of the conv and linear layers, the convention of the 2015–2016 literature
(ResNet-50's "3.8 × 10⁹ FLOPs" are multiply-adds); label sets for age groups, ethnicity and emotion (the seven
basic expressions) are ours; age and emotion branch one stage earlier than gender and ethnicity, following the
paper's finding. :func:`count_multiply_adds` measures the budget (≈ 0.99 G multiply-adds at 224 px).

The ``tiny`` preset is a fashion classifier (category, colour, pattern) at 64 px: colour branches early (a
low-level cue), pattern in the middle, category from the last stage.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fine_infer.errors import ConfigError
from fine_infer.labels import CATEGORIES, COLOURS, PATTERNS
from fine_infer.models._builder import ZooModel
from fine_infer.models._registry import register
from fine_infer.specs import IMAGENET_MEAN, IMAGENET_STD, GraphSpec, ImagePreprocess, TensorSpec

Head = tuple[str, tuple[str, ...], int]  # (head name, class labels, branch stage index)

# The fashion label sets (fine_infer.labels, shared with the generated catalogue) under the names the presets use.
FASHION_CATEGORIES: tuple[str, ...] = CATEGORIES
FASHION_COLOURS: tuple[str, ...] = COLOURS
FASHION_PATTERNS: tuple[str, ...] = PATTERNS

# Face attributes of the paper; the label sets are our assumption (see the module docstring).
FACE_AGE: tuple[str, ...] = ("0-12", "13-19", "20-29", "30-39", "40-49", "50-59", "60+")
FACE_GENDER: tuple[str, ...] = ("female", "male")
FACE_ETHNICITY: tuple[str, ...] = ("african", "east asian", "european", "hispanic", "middle eastern", "south asian")
FACE_EMOTION: tuple[str, ...] = ("anger", "disgust", "fear", "happiness", "neutral", "sadness", "surprise")

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")  # a head name is an ONNX output name and a module key


@dataclass(frozen=True)
class AttributesConfig:
    """Every size of the attribute classifier.

    ``heads``: per head ``(name, class labels, branch stage index)``, in output order. ``trunk_widths`` and
    ``trunk_depths``: channels and conv layers per trunk stage. ``head_width``: channels of each head's conv.
    """

    heads: tuple[Head, ...]
    image_size: int = 224
    trunk_widths: tuple[int, ...] = (32, 64, 128, 256, 512)
    trunk_depths: tuple[int, ...] = (1, 2, 2, 2, 3)
    head_width: int = 128

    def __post_init__(self) -> None:
        # Normalise lists (a config read back from a JSON manifest) to tuples, so configs compare and hash equal.
        heads = tuple((str(h[0]), tuple(str(x) for x in h[1]), int(h[2])) for h in self.heads)
        object.__setattr__(self, "heads", heads)
        object.__setattr__(self, "trunk_widths", tuple(int(w) for w in self.trunk_widths))
        object.__setattr__(self, "trunk_depths", tuple(int(d) for d in self.trunk_depths))

    @property
    def head_names(self) -> tuple[str, ...]:
        """Head names in output order."""
        return tuple(h[0] for h in self.heads)


def paper_config() -> AttributesConfig:
    """Face attributes at 224 px within the paper's ~1 G multiply-add budget; age and emotion branch earlier."""
    return AttributesConfig(
        heads=(
            ("age", FACE_AGE, 3),
            ("gender", FACE_GENDER, 4),
            ("ethnicity", FACE_ETHNICITY, 4),
            ("emotion", FACE_EMOTION, 3),
        ),
        image_size=224,
        trunk_widths=(32, 64, 128, 256, 512),
        trunk_depths=(1, 2, 2, 2, 3),
        head_width=128,
    )


def tiny_config() -> AttributesConfig:
    """Fashion attributes at 64 px for tests and the demo (milliseconds on a CPU)."""
    return AttributesConfig(
        heads=(
            ("category", FASHION_CATEGORIES, 3),
            ("colour", FASHION_COLOURS, 1),
            ("pattern", FASHION_PATTERNS, 2),
        ),
        image_size=64,
        trunk_widths=(8, 16, 24, 32),
        trunk_depths=(1, 1, 1, 1),
        head_width=16,
    )


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class AttributeHead(nn.Module):
    """One head: ``conv3×3 → BN → ReLU → global average pool → Linear`` to ``n_classes`` logits."""

    def __init__(self, c_in: int, width: int, n_classes: int) -> None:
        super().__init__()
        self.conv = _conv_bn_relu(c_in, width)
        self.fc = nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map (B, C, H, W) → logits (B, n_classes)."""
        return self.fc(self.conv(x).mean(dim=(2, 3)))


class AttributesNet(ZooModel):
    """Shared CNN trunk with one classifier head per attribute, each branching off at its own trunk stage.

    Parameters: ``stages.<i>.<j>.*`` (trunk stage ``i``, conv ``j``) and ``heads.<name>.{conv,fc}.*``. Every
    configured stage is built (a checkpoint of the whole trunk loads), but only stages up to the deepest branch run.
    """

    config: AttributesConfig
    graph_methods = {"attributes": "classify"}

    def __init__(self, config: AttributesConfig) -> None:
        super().__init__(config)
        _validate(config)
        self.stages = nn.ModuleList()
        c_in = 3
        for width, depth in zip(config.trunk_widths, config.trunk_depths):
            # The first conv of every stage halves the resolution; the rest keep it.
            layers = [_conv_bn_relu(c_in, width, stride=2)] + [_conv_bn_relu(width, width) for _ in range(depth - 1)]
            self.stages.append(nn.Sequential(*layers))
            c_in = width
        self.heads = nn.ModuleDict()
        for name, labels, branch in config.heads:
            try:
                self.heads[name] = AttributeHead(config.trunk_widths[branch], config.head_width, len(labels))
            except KeyError as exc:  # a name that is already an nn.Module attribute ("training", "forward", …)
                raise ConfigError(f"attributes head name {name!r} cannot be used: {exc}") from None
        self._last_stage = max(branch for _, _, branch in config.heads)

    def classify(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``pixels`` (B, 3, S, S) → one logits tensor (B, n_classes) per head, in head order."""
        features: list[torch.Tensor] = []
        x = pixels
        for stage in self.stages[: self._last_stage + 1]:
            x = stage(x)
            features.append(x)
        return tuple(self.heads[name](features[branch]) for name, _, branch in self.config.heads)

    def graphs(self) -> dict[str, GraphSpec]:
        """One ``classify`` graph, ``attributes``: pixels → one logits output per head, named after the head."""
        S = self.config.image_size
        return {
            "attributes": GraphSpec(
                "attributes",
                "classify",
                (TensorSpec("pixels", "float32", ("batch", 3, S, S)),),
                tuple(TensorSpec(name, "float32", ("batch", len(labels))) for name, labels, _ in self.config.heads),
            )
        }

    @property
    def image_preprocess(self) -> ImagePreprocess:
        """Resize the shorter side to S (bilinear), centre-crop S×S, ImageNet mean/std."""
        S = self.config.image_size
        return ImagePreprocess(
            size=S, crop=S, resize="shorter", interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD
        )

    @property
    def class_labels(self) -> dict[str, list[str]]:
        """Per head name, the label of each logit."""
        return {name: list(labels) for name, labels, _ in self.config.heads}

    def checkpoint_filter(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Strip a DataParallel ``module.`` prefix; our own layout passes through."""
        return {k.removeprefix("module."): v for k, v in state.items()}


def _validate(config: AttributesConfig) -> None:
    """Raise :class:`ConfigError` for a config the model cannot be built from."""
    n = len(config.trunk_widths)
    if n == 0 or len(config.trunk_depths) != n:
        raise ConfigError(
            f"attributes trunk_widths ({len(config.trunk_widths)}) and trunk_depths ({len(config.trunk_depths)}) "
            "must be non-empty and of the same length"
        )
    if min(config.trunk_widths) < 1 or min(config.trunk_depths) < 1 or config.head_width < 1:
        raise ConfigError("attributes trunk widths, depths and head_width must be positive")
    if config.image_size < 1 or config.image_size % (2**n):
        raise ConfigError(
            f"attributes image_size must be a positive multiple of {2**n} ({n} stride-2 stages), "
            f"got {config.image_size}"
        )
    if not config.heads:
        raise ConfigError("attributes config needs at least one head")
    seen: set[str] = set()
    for name, labels, branch in config.heads:
        if not _NAME.match(name) or name == "pixels":
            raise ConfigError(f"attributes head name {name!r} must be an identifier other than 'pixels'")
        if name in seen:
            raise ConfigError(f"attributes head {name!r} is declared twice")
        seen.add(name)
        if not labels or len(set(labels)) != len(labels):
            raise ConfigError(f"attributes head {name!r} needs at least one label and no duplicates, got {labels}")
        if not 0 <= branch < n:
            raise ConfigError(f"attributes head {name!r} branches at stage {branch}; the trunk has stages 0..{n - 1}")


@torch.no_grad()
def count_multiply_adds(model: AttributesNet) -> dict[str, int]:
    """Multiply-accumulates of one image through ``model``, measured by running it: per trunk stage
    (``stages.<i>``), per head (``heads.<name>``) and ``total``. Counts conv and linear layers (BN, ReLU and
    pooling are negligible); stages past the deepest branch do not run and so count nothing."""
    counts: dict[str, int] = {}
    handles = []

    def hook(name: str):
        def fn(mod: nn.Module, inputs: Any, out: torch.Tensor) -> None:
            if isinstance(mod, nn.Conv2d):
                per_out = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
            else:
                per_out = mod.in_features
            part = ".".join(name.split(".")[:2])
            counts[part] = counts.get(part, 0) + per_out * out.numel()

        return fn

    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            handles.append(mod.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()  # a training-mode pass would update the BN running statistics
    try:
        S = model.config.image_size
        param = next(model.parameters())
        model.classify(torch.zeros(1, 3, S, S, dtype=param.dtype, device=param.device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    counts["total"] = sum(counts.values())
    return counts


register(
    "attributes",
    AttributesNet,
    {"tiny": tiny_config, "paper": paper_config},
    description="shared CNN trunk with per-attribute classifier heads branching at configurable depths",
    source="Baumgartner & Culpepper 2016, Deep Architectures for Face Attributes (arXiv:1609.09018)",
)

__all__ = ["AttributeHead", "AttributesConfig", "AttributesNet", "count_multiply_adds", "paper_config", "tiny_config"]
