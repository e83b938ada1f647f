"""Plain-data descriptions shared by models, export, the bundle and the runtime (no torch here).

A :class:`GraphSpec` names a graph's inputs and outputs with dtypes and shapes; a shape entry is an int or an
axis name (``"batch"``, ``"sequence"``) that is dynamic in the exported graph. The preprocess specs say how raw
images and strings become those inputs; they are written to the bundle manifest and read back by the runtime.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, numpy dtype name, shape (ints or dynamic axis names)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TensorSpec":
        return cls(d["name"], d["dtype"], tuple(d["shape"]))


@dataclass(frozen=True)
class GraphSpec:
    """An inference graph. ``task`` is one of ``embed_image``, ``embed_text``, ``compose``, ``classify``."""

    name: str
    task: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Per input/output name, the axes that are dynamic, by index."""
        return {
            t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in (*self.inputs, *self.outputs)
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "task": self.task,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GraphSpec":
        return cls(
            d["name"],
            d["task"],
            tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
        )


@dataclass(frozen=True)
class ImagePreprocess:
    """How an RGB image becomes a normalised CHW float32 tensor.

    ``resize="exact"`` resizes straight to ``size``×``size`` (aspect not kept; Fashion-FINE, SigLIP);
    ``resize="shorter"`` resizes the shorter side to ``size`` and centre-crops ``crop``×``crop`` (ImageNet/CLIP).

    Optional fields (written only when they differ from the default, so older manifests read and hash the same):
    ``crop_rounding`` is how the crop's offset is rounded, ``"round"`` (torchvision: ``round((w - crop) / 2)``) or
    ``"floor"`` (Hugging Face image processors: ``(w - crop) // 2``); ``rescale`` multiplies the 0-255 pixels before
    ``mean``/``std`` (1/255 divides by 255); ``alpha`` is what transparency becomes, ``"drop"`` (the stored RGB) or
    ``"white"`` (composited onto white, as Hugging Face's ``convert_rgb``).
    """

    size: int
    crop: int
    resize: str = "shorter"
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_rounding: str = "round"
    rescale: float = 1 / 255
    alpha: str = "drop"

    def to_dict(self) -> dict[str, Any]:
        return _without_defaults(self, _IMAGE_OPTIONAL)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ImagePreprocess":
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})


_IMAGE_OPTIONAL = {"crop_rounding": "round", "rescale": 1 / 255, "alpha": "drop"}


def _without_defaults(spec: Any, optional: dict[str, Any]) -> dict[str, Any]:
    """``asdict`` without the optional fields that hold their default (fields added after format version 1)."""
    return {k: v for k, v in asdict(spec).items() if not (k in optional and v == optional[k])}


@dataclass(frozen=True)
class TextPreprocess:
    """How strings become ``input_ids``/``attention_mask`` (int64, shape (batch, sequence)).

    ``tokenizer`` is ``wordpiece`` (BERT), ``bpe`` (CLIP), ``word`` (MAAF's word vocabulary) or ``hf`` (any
    Hugging Face ``tokenizer.json``, shipped as it is apart from its own padding and truncation, which these fields
    replace: its normaliser, pre-tokeniser, model and special-token template are the source model's); the tokenizer
    itself ships in the bundle as ``tokenizer.json``. ``padding="max_length"`` pads every batch to ``max_length``
    (needed where the model pools over padding, as Fashion-FINE's paper and SigLIP do); ``"longest"`` pads to the
    longest text.

    The official text conventions, applied to each raw string before the tokenizer (optional fields, written only
    when set, so older manifests read and hash the same; :mod:`fine_infer.textclean` defines them): ``clean`` names a
    cleaning (``"pre_caption"``: Fashion-FINE's; ``"clip"``: CLIP's ftfy/HTML/whitespace cleaning and lowercasing)
    with its arguments ``clean_args`` (e.g. ``{"max_words": 30}``); then ``template`` (holding ``{text}`` once) wraps
    the cleaned text, as ``"the image description is {text}"``.
    """

    tokenizer: str
    max_length: int
    padding: str = "longest"
    pad_id: int = 0
    first_word_id: int = 0  # ids below this are special tokens; example inputs draw above it
    lowercase: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    template: str | None = None
    clean: str | None = None
    clean_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from fine_infer.textclean import check_conventions

        check_conventions(self.clean, self.clean_args, self.template)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if not (k in _TEXT_OPTIONAL and v == _TEXT_OPTIONAL[k])}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TextPreprocess":
        return cls(**d)


_TEXT_OPTIONAL: dict[str, Any] = {"template": None, "clean": None, "clean_args": {}}
