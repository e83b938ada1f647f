"""One training objective per arch: how a minibatch is drawn from :class:`TrainData` and what loss it gets.

Each objective is an ``nn.Module`` so that the training-only parameters of the papers (Fashion-FINE's contrastive
temperature ``temp``, MAAF's ``NormalizationLayer`` scale) are optimised with the model but never enter the
model's state dict: the shipped weights hold exactly the zoo model's keys.

- ``fashion-fine``: HNM-F (:func:`~fine_infer.tools.train.losses.hnm_f_loss`) between image and caption embeddings;
  items of the same product in a batch are positives of each other (ALBEF's ``idx`` targets). The official
  training also has a momentum encoder with a feature queue, momentum distillation and an image–text matching
  head; those serve the fusion encoder the dual-encoder inference graphs do not use, and are left out.
- ``maaf`` / ``raf``: batch-softmax (:func:`~fine_infer.tools.train.losses.batch_softmax_loss`) of composed queries
  against gallery embeddings of their targets, scaled by a learned ``NormalizationLayer`` scale (init 4.0).
- ``triplet``: semi-hard triplet loss over P products × K images per batch.
- ``attributes``: one cross-entropy per head, summed.
"""

from __future__ import annotations

import torch
from torch import nn

from fine_infer.tools.train.data import TrainData, trim_padding
from fine_infer.tools.train.losses import (
    batch_softmax_loss,
    hnm_f_loss,
    multi_head_cross_entropy,
    semi_hard_triplet_loss,
)
from fine_infer.tools.train.recipes import Recipe


class Objective(nn.Module):
    """Draws minibatches (:meth:`sample`) and scores them (:meth:`loss`); may own training-only parameters."""

    pair_seeds: tuple[int, ...] = ()  # composed pairs to build into the data (maaf, raf)

    def __init__(self, recipe: Recipe) -> None:
        super().__init__()
        self.recipe = recipe

    def sample(self, data: TrainData, generator: torch.Generator) -> torch.Tensor:
        """Indices of one minibatch (items, or pairs for composed objectives)."""
        return data.random_batch(self.recipe.batch_size, generator)

    def loss(self, model: nn.Module, data: TrainData, idx: torch.Tensor) -> torch.Tensor:
        """The scalar loss of minibatch ``idx``."""
        raise NotImplementedError  # abstract


class HNMFObjective(Objective):
    """Fashion-FINE: focal image–text contrastive loss with a learnable temperature (init 0.07, kept in
    [0.001, 0.5] as the official code clamps it)."""

    def __init__(self, recipe: Recipe) -> None:
        super().__init__(recipe)
        self.temp = nn.Parameter(torch.tensor(float(recipe.temp)))

    def loss(self, model: nn.Module, data: TrainData, idx: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        image = model.embed_image(data.pixels[idx])
        text = model.embed_text(data.caption_ids[idx], data.caption_mask[idx])
        r = self.recipe
        return hnm_f_loss(image, text, self.temp, data.labels["product"][idx], r.focal_alpha, r.focal_gamma)


class BatchSoftmaxObjective(Objective):
    """MAAF / RAF: composed query vs target gallery embedding, batch softmax with a learned scale."""

    def __init__(self, recipe: Recipe) -> None:
        super().__init__(recipe)
        self.pair_seeds = tuple(range(recipe.pair_seeds))
        self.norm_scale = nn.Parameter(torch.tensor(float(recipe.norm_scale)))

    def sample(self, data: TrainData, generator: torch.Generator) -> torch.Tensor:
        return data.pair_batch(self.recipe.batch_size, generator)

    def loss(self, model: nn.Module, data: TrainData, idx: torch.Tensor) -> torch.Tensor:
        ref, tgt = data.pairs[idx, 0], data.pairs[idx, 1]
        ids, mask = trim_padding(data.pair_ids[idx], data.pair_mask[idx])
        query = model.compose(data.pixels[ref], ids, mask)
        target = model.gallery(data.pixels[tgt])
        return batch_softmax_loss(query, target, self.norm_scale**2)


class TripletObjective(Objective):
    """Triplet loss with online semi-hard negatives over P products × K images."""

    def sample(self, data: TrainData, generator: torch.Generator) -> torch.Tensor:
        r = self.recipe
        return data.pk_batch(r.batch_size // r.per_product, r.per_product, generator)

    def loss(self, model: nn.Module, data: TrainData, idx: torch.Tensor) -> torch.Tensor:
        return semi_hard_triplet_loss(model.embed(data.pixels[idx]), data.labels["product"][idx], self.recipe.margin)


class AttributesObjective(Objective):
    """Cross-entropy per attribute head (heads named after catalogue attributes)."""

    def loss(self, model: nn.Module, data: TrainData, idx: torch.Tensor) -> torch.Tensor:
        logits = model.classify(data.pixels[idx])
        targets = [data.labels[name][idx] for name in model.config.head_names]
        return multi_head_cross_entropy(logits, targets)


OBJECTIVES: dict[str, type[Objective]] = {
    "fashion-fine": HNMFObjective,
    "maaf": BatchSoftmaxObjective,
    "raf": BatchSoftmaxObjective,
    "triplet": TripletObjective,
    "attributes": AttributesObjective,
}

__all__ = [
    "AttributesObjective",
    "BatchSoftmaxObjective",
    "HNMFObjective",
    "OBJECTIVES",
    "Objective",
    "TripletObjective",
]
