"""The generated catalogue as training tensors, made with each model's own preprocessing and tokenizer.

:class:`TrainData` holds one split: pixels exactly as the model's :attr:`image_preprocess` makes them (the same
numpy code the runtime runs), captions and FashionIQ-style relative captions tokenized by the model's own
tokenizer, and integer labels (category, colour, pattern and the product = all three). Minibatch samplers draw
from a seeded ``torch.Generator``, so a run is reproducible:

- :meth:`TrainData.random_batch`: items uniformly without replacement (contrastive and classification objectives);
- :meth:`TrainData.pk_batch`: ``P`` products × ``K`` items each (triplet loss needs positives in the batch);
- :meth:`TrainData.pair_batch`: composed-retrieval pairs (reference, relative caption, target).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from fine_infer.tools.catalogue import (
    CATEGORIES,
    COLOURS,
    PATTERNS,
    CatalogueItem,
    attribute_key,
    composed_pairs,
    held_out_split,
)
from fine_infer.preprocess import preprocess_images
from fine_infer.tokenization import encode

PRODUCTS: tuple[tuple[str, str, str], ...] = tuple((c, k, p) for c in CATEGORIES for k in COLOURS for p in PATTERNS)
_PRODUCT_INDEX = {key: i for i, key in enumerate(PRODUCTS)}


def product_label(item: CatalogueItem) -> int:
    """The index of the item's ``(category, colour, pattern)`` in :data:`PRODUCTS`."""
    return _PRODUCT_INDEX[attribute_key(item)]


@functools.lru_cache(maxsize=4)
def catalogue_split(n_train: int, n_test: int, seed: int, size: int) -> tuple[tuple[CatalogueItem, ...], ...]:
    """:func:`fine_infer.tools.catalogue.held_out_split`, cached per process (rendering costs ~5 ms an item)."""
    train, test = held_out_split(n_train, n_test, seed, size)
    return tuple(train), tuple(test)


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


@dataclass
class TrainData:
    """One catalogue split as tensors for ``model`` (see the module docstring)."""

    items: tuple[CatalogueItem, ...]
    pixels: torch.Tensor  # (N, 3, S, S) float32
    labels: dict[str, torch.Tensor]  # category, colour, pattern, product: (N,) int64
    caption_ids: torch.Tensor | None = None  # (N, L) int64
    caption_mask: torch.Tensor | None = None
    pairs: torch.Tensor | None = None  # (M, 2) int64: reference index, target index
    pair_ids: torch.Tensor | None = None  # (M, L') int64: relative captions
    pair_mask: torch.Tensor | None = None

    @classmethod
    def build(
        cls, model, items: Sequence[CatalogueItem], pair_seeds: Sequence[int] = (), batch: int = 512
    ) -> "TrainData":
        """Preprocess ``items`` for ``model`` (a :class:`fine_infer.models.ZooModel`); ``pair_seeds`` adds the
        composed pairs of :func:`fine_infer.tools.catalogue.composed_pairs` for each seed (one target per item per seed)."""
        items = tuple(items)
        spec = model.image_preprocess
        pixels = np.concatenate([preprocess_images([it.image for it in items[s]], spec) for s in _chunks(len(items), batch)])
        labels = {
            "category": torch.tensor([CATEGORIES.index(it.category) for it in items]),
            "colour": torch.tensor([COLOURS.index(it.colour) for it in items]),
            "pattern": torch.tensor([PATTERNS.index(it.pattern) for it in items]),
            "product": torch.tensor([product_label(it) for it in items]),
        }
        data = cls(items, torch.from_numpy(pixels), labels)
        text = model.text_preprocess
        if text is not None:
            tok = model.build_tokenizer()
            ids, mask = encode(tok, [it.caption for it in items], text)
            data.caption_ids, data.caption_mask = torch.from_numpy(ids), torch.from_numpy(mask)
            if pair_seeds:
                index = {it.id: i for i, it in enumerate(items)}
                triples = [p for s in pair_seeds for p in composed_pairs(items, seed=s)]
                data.pairs = torch.tensor([[index[a], index[b]] for a, b, _ in triples])
                ids, mask = encode(tok, [t for _, _, t in triples], text)
                data.pair_ids, data.pair_mask = torch.from_numpy(ids), torch.from_numpy(mask)
        return data

    def __len__(self) -> int:
        return len(self.items)

    # --- samplers -------------------------------------------------------------------------------------------------
    def random_batch(self, size: int, generator: torch.Generator) -> torch.Tensor:
        """``size`` distinct item indices, uniformly at random."""
        return torch.randperm(len(self), generator=generator)[:size]

    def pk_batch(self, products: int, per_product: int, generator: torch.Generator) -> torch.Tensor:
        """``products`` random products (among those with at least two items) × up to ``per_product`` items each."""
        groups = self._product_groups()
        eligible = [g for g in groups if len(g) >= 2]
        if not eligible:
            raise ValueError("no product has two items: a larger catalogue is needed for triplet sampling")
        chosen = torch.randperm(len(eligible), generator=generator)[:products]
        out = []
        for c in chosen.tolist():
            g = eligible[c]
            out.append(g[torch.randperm(len(g), generator=generator)[:per_product]])
        return torch.cat(out)

    def pair_batch(self, size: int, generator: torch.Generator) -> torch.Tensor:
        """``size`` distinct indices into :attr:`pairs`."""
        if self.pairs is None:
            raise ValueError("this split was built without composed pairs (pass pair_seeds)")
        return torch.randperm(len(self.pairs), generator=generator)[:size]

    @functools.cached_property
    def _groups(self) -> list[torch.Tensor]:
        product = self.labels["product"]
        order = torch.argsort(product, stable=True)
        _, counts = torch.unique_consecutive(product[order], return_counts=True)
        return list(torch.split(order, counts.tolist()))

    def _product_groups(self) -> list[torch.Tensor]:
        return self._groups


def trim_padding(ids: torch.Tensor, mask: torch.Tensor, keep: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut columns that are padding in every row (for "longest"-padded tokenizers); ``keep`` fixes the width."""
    width = keep if keep is not None else max(1, int(mask.sum(dim=1).max()))
    return ids[:, :width], mask[:, :width]


__all__ = ["PRODUCTS", "TrainData", "catalogue_split", "product_label", "trim_padding"]
