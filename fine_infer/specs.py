"""Plain-data descriptions shared by models, export, the bundle and the runtime (no torch here).

A :class:`GraphSpec` names a graph's inputs and outputs with dtypes and shapes; a shape entry is an int or an
axis name (``"batch"``, ``"sequence"``) that is dynamic in the exported graph. The preprocess specs say how raw
images and strings become those inputs; they are written to the bundle manifest and read back by the runtime.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# What a manifest (a file from elsewhere) may ask for: each ``from_dict`` checks types and ranges and raises
# ValueError naming the field, so a hostile value is refused when read, not met as a 21 GB allocation later.
MAX_IMAGE_SIDE = 8192
MAX_TEXT_TOKENS = 65536
MAX_DIM = 1 << 31
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")
TOKENIZERS = ("wordpiece", "bpe", "word", "hf")
DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")


def _need(ok: bool, what: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{what}, not {value!r}"[:200])


def _int(d: dict[str, Any], key: str, lo: int, hi: int) -> int:
    v = d[key]
    _need(type(v) is int and lo <= v <= hi, f"{key} must be an integer in {lo}..{hi}", v)
    return v


def _one_of(d: dict[str, Any], key: str, options: tuple[str, ...]) -> str:
    v = d[key]
    _need(isinstance(v, str) and v in options, f"{key} must be one of {', '.join(options)}", v)
    return v


def _finite3(d: dict[str, Any], key: str, positive: bool = False) -> tuple[float, float, float]:
    v = d[key]
    ok = (isinstance(v, (list, tuple)) and len(v) == 3
          and all(type(x) in (int, float) and math.isfinite(x) and (x > 0 or not positive) for x in v))
    _need(ok, f"{key} must be 3 finite{' positive' if positive else ''} numbers", v)
    return float(v[0]), float(v[1]), float(v[2])


def _object(d: Any, what: str) -> dict[str, Any]:
    _need(isinstance(d, dict), f"{what} must be an object", type(d).__name__)
    return d


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
        """Read (and check) a manifest's entry."""
        _object(d, "a tensor")
        _need(isinstance(d["name"], str), "a tensor name must be a string", d["name"])
        _one_of(d, "dtype", DTYPES)
        shape = d["shape"]
        _need(isinstance(shape, list) and len(shape) <= 8 and all(
            (type(x) is int and 0 <= x <= MAX_DIM) or (isinstance(x, str) and x) for x in shape),
            f"shape of {d['name']} must be up to 8 sizes or axis names", shape)
        return cls(d["name"], d["dtype"], tuple(shape))


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
        """Read (and check) a manifest's graph entry."""
        _object(d, "a graph")
        for key in ("name", "task"):
            _need(isinstance(d[key], str), f"graph {key} must be a string", d[key])
        for key in ("inputs", "outputs"):
            _need(isinstance(d[key], list), f"graph {key} must be a list", d[key])
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
        """Read (and check) a manifest's image preprocessing."""
        d = dict(_object(d, "preprocess.image"))
        _int(d, "size", 1, MAX_IMAGE_SIDE)
        _need(_int(d, "crop", 1, MAX_IMAGE_SIDE) <= d["size"], "crop must be at most size", d["crop"])
        _one_of(d, "resize", ("shorter", "exact"))
        _one_of(d, "interpolation", INTERPOLATIONS)
        d["mean"], d["std"] = _finite3(d, "mean"), _finite3(d, "std", positive=True)
        for key, options in (("crop_rounding", ("round", "floor")), ("alpha", ("drop", "white"))):
            if key in d:
                _one_of(d, key, options)
        if "rescale" in d:
            v = d["rescale"]
            _need(type(v) in (int, float) and math.isfinite(v) and v > 0, "rescale must be a positive number", v)
        return cls(**d)


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
        """Read (and check) a manifest's text preprocessing."""
        _object(d, "preprocess.text")
        _one_of(d, "tokenizer", TOKENIZERS)
        _int(d, "max_length", 1, MAX_TEXT_TOKENS)
        if "padding" in d:
            _one_of(d, "padding", ("longest", "max_length"))
        for key in ("pad_id", "first_word_id"):
            if key in d:
                _int(d, key, 0, MAX_DIM)
        if "lowercase" in d:
            _need(isinstance(d["lowercase"], bool), "lowercase must be true or false", d["lowercase"])
        for key in ("extra", "clean_args"):
            if key in d:
                _object(d[key], key)
        for key in ("template", "clean"):
            if d.get(key) is not None:
                _need(isinstance(d[key], str), f"{key} must be a string", d[key])
        return cls(**d)


_TEXT_OPTIONAL: dict[str, Any] = {"template": None, "clean": None, "clean_args": {}}
