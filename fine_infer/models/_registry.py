"""The model-family registry: specs every arch declares, the base class, and ``create``.

An arch is registered once with its presets (``tiny`` and ``paper``) and a builder. Every built model is a
:class:`ZooModel`: an ``nn.Module`` that also declares its inference graphs (named inputs and outputs), its
preprocessing and its tokenizer. Export, the runtime's torch backend and the tests read only these declarations,
so a new arch needs no change anywhere else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from fine_infer.errors import ConfigError
from fine_infer.specs import GraphSpec, ImagePreprocess, TextPreprocess


class ZooModel(nn.Module):
    """Base class of every registered arch.

    Subclasses set ``arch`` and implement :meth:`graphs`, :meth:`graph_module` and, where they read text,
    :meth:`build_tokenizer`. ``config`` is the arch's frozen config dataclass.
    """

    arch: ClassVar[str] = ""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config

    # --- declarations -------------------------------------------------------------------------------------------
    def graphs(self) -> dict[str, GraphSpec]:
        """The inference graphs this model exports, by name (e.g. ``image`` and ``text``)."""
        raise NotImplementedError  # abstract

    def graph_module(self, name: str) -> nn.Module:
        """An ``nn.Module`` whose ``forward`` takes the graph's inputs positionally, in spec order, and returns
        its outputs (one tensor, or a tuple in spec order). It shares this model's parameters."""
        raise NotImplementedError  # abstract

    @property
    def image_preprocess(self) -> ImagePreprocess | None:
        """How raw images become the ``pixels`` input, or None for a text-only model."""
        return None

    @property
    def text_preprocess(self) -> TextPreprocess | None:
        """How strings become ``input_ids``/``attention_mask``, or None for an image-only model."""
        return None

    def build_tokenizer(self):  # -> tokenizers.Tokenizer | None
        """The ``tokenizers.Tokenizer`` matching :attr:`text_preprocess` (None for image-only models)."""
        return None

    @property
    def class_labels(self) -> dict[str, list[str]] | None:
        """For classifiers: per output name, the label of each logit (None for embedding models)."""
        return None

    @property
    def embed_dim(self) -> int | None:
        """Dimension of the L2-normalised embeddings (None for classifiers)."""
        return None

    # --- helpers shared by every arch ---------------------------------------------------------------------------
    def graph(self, name: str) -> GraphSpec:
        """The spec of one graph; unknown names are a :class:`ConfigError` listing the known ones."""
        graphs = self.graphs()
        if name not in graphs:
            raise ConfigError(f"arch {self.arch!r} has no graph {name!r}; it has: {', '.join(graphs)}")
        return graphs[name]

    def example_inputs(
        self, name: str, batch: int = 2, seq_len: int | None = None, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Fresh random, valid inputs for graph ``name``: normalised-looking pixels, token ids inside the
        vocabulary, attention masks with ragged lengths (every row keeps at least its first two tokens)."""
        spec = self.graph(name)
        text = self.text_preprocess
        L = seq_len or (text.max_length if text else 16)
        out: dict[str, torch.Tensor] = {}
        lengths = None
        for t in spec.inputs:
            shape = [batch if d == "batch" else (L if d == "sequence" else d) for d in t.shape]
            if t.name == "input_ids":
                vocab = self.config.vocab_size
                out[t.name] = torch.randint(text.first_word_id if text else 0, vocab, shape, generator=generator)
            elif t.name == "attention_mask":
                lengths = torch.randint(min(2, L), L + 1, (batch,), generator=generator)
                lengths[0] = L  # one full row so the padded positions are exercised both ways
                out[t.name] = (torch.arange(L)[None, :] < lengths[:, None]).to(torch.int64)
            elif t.dtype.startswith("float"):
                out[t.name] = torch.randn(shape, generator=generator)
            else:
                raise ConfigError(f"no example generator for input {t.name!r} of {self.arch}:{name}")
        if lengths is not None and "input_ids" in out:
            ids = out["input_ids"]
            valid = out["attention_mask"].bool()
            if text is not None:
                ids = torch.where(valid, ids, torch.full_like(ids, text.pad_id))
            out["input_ids"] = ids
        return out

    def load_checkpoint(self, path: str | Path, strict: bool = True) -> None:
        """Load weights (``.safetensors`` or a ``torch.save`` file read with ``weights_only=True``).

        The arch's :meth:`checkpoint_filter` maps official key layouts to ours first; a key mismatch raises
        :class:`fine_infer.errors.CheckpointError` listing the missing and unexpected keys."""
        from fine_infer.models._checkpoint import load_state_dict_file, apply_state_dict

        state = load_state_dict_file(path)
        state = self.checkpoint_filter(state)
        apply_state_dict(self, state, strict=strict, source=str(path))

    def checkpoint_filter(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map an official checkpoint's keys/shapes onto this module's (identity unless overridden)."""
        return state


@dataclass(frozen=True)
class ArchEntry:
    """One registered arch: its model class, presets and a one-line description."""

    name: str
    model_cls: type[ZooModel]
    presets: dict[str, Callable[[], Any]]
    description: str = ""
    source: str = ""


_REGISTRY: dict[str, ArchEntry] = {}


def register(
    name: str, model_cls: type[ZooModel], presets: dict[str, Callable[[], Any]], description: str = "", source: str = ""
) -> None:
    """Register an arch. ``presets`` maps a preset name to a zero-argument function returning its config."""
    if name in _REGISTRY:
        raise ConfigError(f"arch {name!r} is registered twice")
    if not {"tiny", "paper"} <= set(presets):
        raise ConfigError(f"arch {name!r} must define 'tiny' and 'paper' presets")
    model_cls.arch = name
    _REGISTRY[name] = ArchEntry(name, model_cls, presets, description, source)


def _ensure_loaded() -> None:
    # Importing the family modules registers them; done lazily so `import fine_infer.models` stays cheap.
    from fine_infer.models import attributes, fashion_fine, maaf, raf, triplet  # noqa: F401


def list_archs() -> list[str]:
    """Names of every registered arch."""
    _ensure_loaded()
    return sorted(_REGISTRY)


def get_arch(name: str) -> ArchEntry:
    """The registry entry of ``name``; an unknown name is a :class:`ConfigError` listing the known ones."""
    _ensure_loaded()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown arch {name!r}; known archs: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def make_config(arch: str, preset: str = "tiny", **overrides: Any) -> Any:
    """The config dataclass of ``arch`` at ``preset`` with ``overrides`` applied (unknown fields are an error)."""
    entry = get_arch(arch)
    if preset not in entry.presets:
        raise ConfigError(f"arch {arch!r} has no preset {preset!r}; presets: {', '.join(entry.presets)}")
    config = entry.presets[preset]()
    if overrides:
        names = {f.name for f in dataclasses.fields(config)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(f"unknown config field(s) for {arch}: {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
        config = dataclasses.replace(config, **overrides)
    return config


def config_from_dict(arch: str, values: dict[str, Any]) -> Any:
    """Rebuild an arch's config from :func:`config_to_dict` output (as stored in a bundle manifest)."""
    entry = get_arch(arch)
    base = entry.presets["tiny"]()
    known = {f.name: f for f in dataclasses.fields(base)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"config for {arch} has unknown field(s): {', '.join(unknown)}")
    fixed = {k: (tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v) for k, v in values.items()}
    return dataclasses.replace(base, **fixed)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-able dict of a config dataclass."""
    return dataclasses.asdict(config)


def create(
    arch: str,
    preset: str = "tiny",
    *,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    **overrides: Any,
) -> ZooModel:
    """Build ``arch`` at ``preset`` (``"tiny"`` or ``"paper"``) in eval mode.

    ``overrides`` replace config fields (``create("triplet", embed_dim=128)``). ``checkpoint`` loads weights
    (safetensors or ``weights_only`` torch files); ``pretrained`` loads the weights shipped with the package
    for the tiny preset where they exist.
    """
    entry = get_arch(arch)
    config = make_config(arch, preset, **overrides)
    model = entry.model_cls(config)
    if pretrained:
        from fine_infer.models._checkpoint import shipped_weights

        model.load_checkpoint(shipped_weights(arch, preset))
    if checkpoint is not None:
        model.load_checkpoint(checkpoint)
    return model.eval()


__all__ = [
    "ArchEntry",
    "ZooModel",
    "config_from_dict",
    "config_to_dict",
    "create",
    "get_arch",
    "list_archs",
    "make_config",
    "register",
]
