"""Hugging Face sources: the model, tokenizer and processor loaded by the source library itself, the modules exported
as the bundle's graphs, the bundle's preprocessing read from the source's own configs, and the source library's own
embedding functions that the source-parity gate compares the bundle with."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Sequence

import numpy as np
import torch

from fine_infer.errors import ConfigError, FineInferError, first_line
from fine_infer.export.gates import GraphJob
from fine_infer.export.hf._folder import SUPPORTED, Folder
from fine_infer.export.hf._inputs import image_sampler, text_sampler
from fine_infer.specs import GraphSpec, ImagePreprocess, TensorSpec, TextPreprocess
from fine_infer.tokenization import hf_text_preprocess, load_hf_tokenizer

EmbedFn = Callable[[Sequence[Any]], np.ndarray]
_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_IDS = TensorSpec("input_ids", "int64", ("batch", "sequence"))
_MASK = TensorSpec("attention_mask", "int64", ("batch", "sequence"))


@dataclass
class Source:
    """What :func:`load_source` read: the graph jobs, the bundle's tokenizer and preprocessing, what to record in the
    manifest, and the source library's own (L2-normalised) embedding of texts and images."""

    jobs: list[GraphJob]
    tokenizer: Any
    text: TextPreprocess
    image: ImagePreprocess | None
    config: dict[str, Any]
    label: str
    embed_text: EmbedFn
    embed_image: EmbedFn | None = None
    versions: dict[str, str] = field(default_factory=dict)


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "?"


def _features(out: Any) -> torch.Tensor:
    """``get_*_features`` returns a tensor (transformers 4) or an output whose ``pooler_output`` is it (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _unit(x: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(x.float(), p=2, dim=-1).detach().numpy()


class SentenceEncoder(torch.nn.Module):
    """A sentence-transformers pipeline (Transformer → Pooling [→ Dense] [→ Normalize]) run by its own modules on
    ``input_ids``/``attention_mask``; ``token_type_ids`` are zeros (one text per row); L2-normalised when the pipeline
    does not normalise itself."""

    def __init__(self, modules: Sequence[torch.nn.Module], token_types: bool, normalize: bool) -> None:
        super().__init__()
        self.stages = torch.nn.ModuleList(modules)
        self.token_types = token_types
        self.normalize = normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        features: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "modality": "text"}
        if self.token_types:
            features["token_type_ids"] = torch.zeros_like(input_ids)
        for stage in self.stages:
            features = stage(features)
        emb = features["sentence_embedding"]
        return torch.nn.functional.normalize(emb, p=2, dim=-1) if self.normalize else emb


class TextTower(torch.nn.Module):
    """``model.get_text_features`` (text tower and projection), L2-normalised; the attention mask is passed only
    where the source's tokenizer emits one."""

    def __init__(self, model: torch.nn.Module, use_mask: bool) -> None:
        super().__init__()
        self.model = model
        self.use_mask = use_mask

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if not self.use_mask:  # keep the input in the graph (the runtime feeds it) without using it
            input_ids = input_ids + attention_mask[:, :1] * 0
        out = self.model.get_text_features(input_ids=input_ids,
                                           attention_mask=attention_mask if self.use_mask else None)
        return torch.nn.functional.normalize(_features(out), p=2, dim=-1)


class ImageTower(torch.nn.Module):
    """``model.get_image_features`` (image tower and projection), L2-normalised."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(_features(self.model.get_image_features(pixel_values=pixels)), p=2, dim=-1)


def _embedding_spec(name: str, task: str, inputs: tuple[TensorSpec, ...], module, example) -> GraphSpec:
    with torch.no_grad():
        dim = int(module(*example).shape[-1])
    return GraphSpec(name, task, inputs, (TensorSpec("embedding", "float32", ("batch", dim)),))


def _text_job(module: torch.nn.Module, tokenizer, text: TextPreprocess) -> GraphJob:
    sampler = text_sampler(tokenizer, text)
    example = sampler(2, min(8, text.max_length), torch.Generator().manual_seed(0))
    spec = _embedding_spec("text", "embed_text", (_IDS, _MASK), module,
                           (example["input_ids"], example["attention_mask"]))
    return GraphJob(spec, module, sampler, text.max_length)


def _sentence_transformers(folder: Folder) -> Source:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise ConfigError(f"--hf with a sentence-transformers folder needs sentence-transformers: pip install "
                          f"'fine-infer[hf]' ({exc})") from None
    st = SentenceTransformer(str(folder.path), device="cpu", local_files_only=True).eval()
    stages = list(st)
    kinds = [type(m).__name__ for m in stages]
    if getattr(st, "default_prompt_name", None):
        raise ConfigError(f"--hf {folder.path}: the model prepends its default prompt "
                          f"{st.default_prompt_name!r} to every text; prompts are not supported")
    if getattr(st, "truncate_dim", None):
        raise ConfigError(f"--hf {folder.path}: truncate_dim {st.truncate_dim} is not supported")
    pooling = stages[kinds.index("Pooling")]
    mode = getattr(pooling, "pooling_mode", None)
    if mode is None and hasattr(pooling, "get_pooling_mode_str"):
        mode = pooling.get_pooling_mode_str()
    _check_positions(folder, int(st.max_seq_length), getattr(getattr(stages[0], "auto_model", None), "config", None))
    tok, info = load_hf_tokenizer(folder.transformer_path)
    lower = bool(getattr(stages[0], "do_lower_case", False))
    if lower:  # sentence-transformers lowercases in Python before tokenizing: the bundle's tokenizer does it instead
        from tokenizers import normalizers

        tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), *([tok.normalizer] if tok.normalizer else [])])
    text = hf_text_preprocess(tok, info, int(st.max_seq_length), "longest")
    hf_tok = st.tokenizer
    token_types = "token_type_ids" in (getattr(hf_tok, "model_input_names", None) or [])
    normalized = "Normalize" in kinds
    module = SentenceEncoder(stages, token_types, normalize=not normalized).eval()

    def embed(texts: Sequence[str]) -> np.ndarray:
        return np.asarray(st.encode(list(texts), normalize_embeddings=True, convert_to_numpy=True, batch_size=16,
                                    show_progress_bar=False), dtype=np.float32)

    config = {
        "library": "sentence-transformers", "folder": str(folder.path), "modules": kinds, "backbone": folder.model_type,
        "pooling": str(mode), "max_seq_length": int(st.max_seq_length),
        "tokenizer_json_truncation": info.get("truncation"),
        "normalize": "the model's Normalize module" if normalized else
                     "added by the export (the model has no Normalize; fine-infer scores by dot product)",
        "token_type_ids": "zeros" if token_types else "not used",
        "do_lower_case": "added to the tokenizer's normaliser" if lower else False,
    }
    return Source([_text_job(module, tok, text)], tok, text, None, config,
                  f"sentence-transformers {_version('sentence-transformers')}", embed,
                  versions={"transformers": _version("transformers"),
                            "sentence-transformers": _version("sentence-transformers")})


def _check_positions(folder: Folder, max_seq_length: int, config: Any) -> None:
    """``max_seq_length`` must fit the model's learned positions (a longer one fails deep inside the export)."""
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and max_seq_length > positions:
        raise ConfigError(f"--hf {folder.path}: max_seq_length {max_seq_length} (sentence_bert_config.json) is more "
                          f"than the model's {positions} positions (max_position_embeddings); set it to at most "
                          f"{positions}")


def image_preprocess_from_processor(d: dict[str, Any], where: str = "the image processor") -> ImagePreprocess:
    """The :class:`ImagePreprocess` of a transformers image processor config (its ``to_dict()``): shortest-edge
    resize and centre crop (CLIP) or an exact square resize (SigLIP), resample, rescale, mean/std, RGB conversion
    onto white; anything else is a :class:`ConfigError` naming it."""
    def bad(what: str) -> ConfigError:
        return ConfigError(f"{where}: {what} is not supported (fine-infer takes a shortest-edge resize with a square "
                           "centre crop, or an exact square resize)")

    if not d.get("do_resize", True):
        raise bad("do_resize=False")
    for key in ("do_pad", "do_reduce_labels", "do_flip_channel_order"):
        if d.get(key):
            raise bad(f"{key}=True")
    size = d.get("size") or {}
    size = {"shortest_edge": size} if isinstance(size, int) else dict(size)
    if size.get("shortest_edge") and not size.get("longest_edge") and not size.get("height"):
        resize, side = "shorter", int(size["shortest_edge"])
    elif size.get("height") and size.get("height") == size.get("width"):
        resize, side = "exact", int(size["height"])
    else:
        raise bad(f"size {size}")
    crop = side
    if d.get("do_center_crop"):
        c = d.get("crop_size") or {}
        c = {"height": c, "width": c} if isinstance(c, int) else dict(c)
        if not c.get("height") or c.get("height") != c.get("width"):
            raise bad(f"crop_size {c}")
        crop = int(c["height"])
    elif resize == "shorter":
        raise bad("a shortest-edge resize without a centre crop (images of every aspect would differ in shape)")
    resample = d.get("resample", 2)
    interpolation = _RESAMPLE_NAMES.get(int(getattr(resample, "value", resample)))
    if interpolation is None:
        raise bad(f"resample {resample}")

    def three(v: Any) -> tuple[float, float, float]:
        v = [float(v)] * 3 if isinstance(v, (int, float)) else [float(x) for x in v]
        if len(v) != 3:
            raise bad(f"mean/std {v}")
        return v[0], v[1], v[2]

    normalize = d.get("do_normalize", True)
    return ImagePreprocess(
        size=side, crop=crop, resize=resize, interpolation=interpolation,
        mean=three(d.get("image_mean", 0.0)) if normalize else (0.0, 0.0, 0.0),
        std=three(d.get("image_std", 1.0)) if normalize else (1.0, 1.0, 1.0),
        crop_rounding="floor", rescale=float(d.get("rescale_factor", 1 / 255)) if d.get("do_rescale", True) else 1.0,
        alpha="white" if d.get("do_convert_rgb", True) is not False else "drop",
    )


def _dual(folder: Folder) -> Source:
    try:
        import transformers
        from transformers import AutoImageProcessor, AutoTokenizer
    except ImportError as exc:
        raise ConfigError(f"--hf needs transformers: pip install 'fine-infer[hf]' ({exc})") from None
    arch = {"clip": "CLIPModel", "siglip": "SiglipModel"}[folder.kind]
    cls = getattr(transformers, arch, None)
    if cls is None:
        raise ConfigError(f"--hf {folder.path}: this transformers ({transformers.__version__}) has no {arch}; "
                          f"fine-infer exports {SUPPORTED}")
    path = str(folder.path)
    model = cls.from_pretrained(path, local_files_only=True).eval()
    hf_tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    try:
        processor = AutoImageProcessor.from_pretrained(path, local_files_only=True, backend="pil")
    except TypeError:  # transformers 4: the slow (PIL/numpy) processor unless use_fast
        processor = AutoImageProcessor.from_pretrained(path, local_files_only=True, use_fast=False)
    tok, info = load_hf_tokenizer(folder.path)
    tc = model.config.text_config
    length = int(tc.max_position_embeddings)
    mml = getattr(hf_tok, "model_max_length", None)
    if isinstance(mml, int) and 0 < mml < length:
        length = mml
    padding = "max_length" if folder.kind == "siglip" else "longest"  # SigLIP was trained on max_length padding
    text = hf_text_preprocess(tok, info, length, padding)
    use_mask = "attention_mask" in (getattr(hf_tok, "model_input_names", None) or [])
    image = image_preprocess_from_processor(processor.to_dict(), f"--hf {path}: {type(processor).__name__}")
    text_module = TextTower(model, use_mask).eval()
    image_module = ImageTower(model).eval()
    sampler = image_sampler(image)
    px = sampler(2, None, torch.Generator().manual_seed(0))["pixels"]
    image_spec = _embedding_spec("image", "embed_image",
                                 (TensorSpec("pixels", "float32", ("batch", 3, image.crop, image.crop)),),
                                 image_module, (px,))
    jobs = [_text_job(text_module, tok, text), GraphJob(image_spec, image_module, sampler)]

    def embed_text(texts: Sequence[str]) -> np.ndarray:
        enc = hf_tok(list(texts), padding="max_length" if padding == "max_length" else True, truncation=True,
                     max_length=length, return_tensors="pt")
        with torch.no_grad():
            out = model.get_text_features(input_ids=enc["input_ids"],
                                          attention_mask=enc.get("attention_mask") if use_mask else None)
        return _unit(_features(out))

    def embed_image(images: Sequence[Any]) -> np.ndarray:
        pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            return _unit(_features(model.get_image_features(pixel_values=pixels)))

    config = {
        "library": "transformers", "folder": path, "architecture": arch,
        "text": "get_text_features, L2-normalised", "image": "get_image_features, L2-normalised",
        "max_length": length, "padding": padding,
        "text_attention_mask": "used" if use_mask else "not used (the tokenizer emits none)",
        "tokenizer": type(hf_tok).__name__, "image_processor": type(processor).__name__,
    }
    return Source(jobs, tok, text, image, config, f"transformers {_version('transformers')}", embed_text, embed_image,
                  versions={"transformers": _version("transformers")})


def load_source(folder: Folder) -> Source:
    """Load a folder classified by :func:`~fine_infer.export.hf._folder.inspect_folder` with its own library.

    Whatever the library raises on a folder it cannot load (malformed configs or tokenizer, pickle-only weights that
    ``weights_only`` refuses, a weights file that is not one, sizes that disagree with the weights) is one
    :class:`ConfigError` naming the folder, the library and its message."""
    library = "sentence-transformers" if folder.kind == "sentence-transformers" else "transformers"
    try:
        return _sentence_transformers(folder) if folder.kind == "sentence-transformers" else _dual(folder)
    except FineInferError:
        raise
    except Exception as exc:  # noqa: BLE001 - the source library on a folder this process did not write
        raise ConfigError(f"--hf {folder.path}: {library} cannot load it ({type(exc).__name__}: {first_line(exc)})"
                          ) from exc
