"""What every arch shares: the :class:`ZooModel` base class and the :class:`GraphAdapter` its graphs export through.

A family declares; this module does the rest. A family subclasses :class:`ZooModel`, sets ``graph_methods``
(graph name → the model method computing it) and implements :meth:`ZooModel.graphs`; graph modules, example inputs,
the checked tokenizer, ``embed_dim`` and checkpoint loading come from here, so a new arch writes none of them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from fine_infer.errors import ConfigError
from fine_infer.models._checkpoint import apply_state_dict, load_state_dict_file
from fine_infer.specs import GraphSpec, ImagePreprocess, TextPreprocess


class GraphAdapter(nn.Module):
    """One inference graph of a model as a module: ``adapter(*inputs)`` returns ``model.<method>(*inputs)``.

    The model is its only submodule (``model``), so it shares the model's parameters and its state-dict keys are
    the model's under ``model.``. Export, the torch runner and the tests call it with the graph's inputs
    positionally, in spec order."""

    def __init__(self, model: nn.Module, method: str) -> None:
        super().__init__()
        if not callable(getattr(model, method, None)):
            raise ConfigError(f"{type(model).__name__} has no method {method!r} to compute a graph with")
        self.model = model
        self.method = method

    @property
    def forward(self) -> Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]:  # type: ignore[override]
        """The model's method itself, not a ``forward(*inputs)`` calling it: the adapter keeps the method's
        signature (``pixels``, ``input_ids``, …), so ``torch.export`` binds ``dynamic_shapes`` by input name."""
        return getattr(self.model, self.method)

    def extra_repr(self) -> str:
        return f"method={self.method!r}"


class ZooModel(nn.Module, ABC):
    """Base class of every registered arch.

    Subclasses set ``graph_methods`` and implement :meth:`graphs`; those that read text also declare
    :attr:`text_preprocess` and have ``vocab_size`` and ``vocab_file`` config fields. ``config`` is the arch's
    frozen config dataclass; ``arch`` is set by :func:`fine_infer.models._registry.register`.
    """

    arch: ClassVar[str] = ""
    graph_methods: ClassVar[dict[str, str]] = {}
    """Graph name → the method computing it from the graph's inputs, positionally (e.g. ``{"image": "embed"}``)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config

    # --- declarations -------------------------------------------------------------------------------------------
    @abstractmethod
    def graphs(self) -> dict[str, GraphSpec]:
        """The inference graphs this model exports, by name (e.g. ``image`` and ``text``)."""

    @property
    def image_preprocess(self) -> ImagePreprocess | None:
        """How raw images become the ``pixels`` input, or None for a text-only model."""
        return None

    @property
    def text_preprocess(self) -> TextPreprocess | None:
        """How strings become ``input_ids``/``attention_mask``, or None for an image-only model."""
        return None

    @property
    def class_labels(self) -> dict[str, list[str]] | None:
        """For classifiers: per output name, the label of each logit (None for embedding models)."""
        return None

    @property
    def embed_dim(self) -> int | None:
        """Dimension of the L2-normalised embeddings: the config's ``embed_dim`` (None for classifiers)."""
        return getattr(self.config, "embed_dim", None)

    # --- helpers shared by every arch ---------------------------------------------------------------------------
    def graph(self, name: str) -> GraphSpec:
        """The spec of one graph; unknown names are a :class:`ConfigError` listing the known ones."""
        graphs = self.graphs()
        if name not in graphs:
            raise ConfigError(f"arch {self.arch!r} has no graph {name!r}; it has: {', '.join(graphs)}")
        return graphs[name]

    def graph_module(self, name: str) -> GraphAdapter:
        """An ``nn.Module`` whose ``forward`` takes the graph's inputs positionally, in spec order, and returns
        its outputs (one tensor, or a tuple in spec order). It shares this model's parameters."""
        self.graph(name)  # unknown names raise ConfigError
        return GraphAdapter(self, self.graph_methods[name])

    def build_tokenizer(self):  # -> tokenizers.Tokenizer | None
        """The ``tokenizers.Tokenizer`` matching :attr:`text_preprocess` (None for image-only models): built-in
        words unless ``config.vocab_file`` names the official vocabulary. Its ids must fit ``config.vocab_size``
        (a :class:`ConfigError` naming the size to create the model with)."""
        text = self.text_preprocess
        if text is None:
            return None
        from fine_infer.tokenization import build_tokenizer, vocab_size  # tokenizers loads only for text models

        tok = build_tokenizer(text, self.config.vocab_file)
        n = vocab_size(tok)
        if n > self.config.vocab_size:
            raise ConfigError(
                f"the {self.arch} tokenizer has {n} ids but the model's vocab_size is {self.config.vocab_size}; "
                f"create the model with vocab_size={n}"
            )
        return tok

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
        state = self.checkpoint_filter(load_state_dict_file(path))
        apply_state_dict(self, state, strict=strict, source=str(path))

    def checkpoint_filter(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map an official checkpoint's keys/shapes onto this module's (identity unless overridden)."""
        return state


__all__ = ["GraphAdapter", "ZooModel"]
