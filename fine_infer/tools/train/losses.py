"""The training objectives of the model family, as plain functions of embeddings or logits.

- :func:`hnm_f_loss`: Fashion-FINE's image–text contrastive loss with focal weighting (HNM-F), as in the official
  ``models/model_retrieval.py`` (``self.focal``): ``-Σ_j α (1 − p_ij)^γ · log p_ij · t_ij`` per row, averaged over
  rows, for image→text and text→image, then the mean of the two. ``p`` is the softmax of the similarities over
  the temperature and ``t`` the target distribution. The focal factor shrinks the loss of rows whose positive is
  already ranked well (``p`` near 1) and keeps the rows where hard negatives take probability mass from the
  positive, so hard negatives dominate the gradient. Defaults are the official ``alpha_focal`` 0.5 and
  ``gamma_focal`` 2.0.
- :func:`batch_softmax_loss`: yahoo/maaf's ``BatchSoftmaxLoss``: cross-entropy of each composed query against every
  target of the minibatch, the diagonal being the positive.
- :func:`semi_hard_triplet_loss`: triplet loss with online semi-hard negative mining inside the minibatch
  (FaceNet; the "online sampling" of Dodds et al. 2018): for every anchor–positive pair, the negative is the
  closest one farther than the positive; if none is farther, the farthest negative.
- :func:`multi_head_cross_entropy`: one cross-entropy per attribute head, summed.

Every function is checked against an independent float64 reference in ``tests/train/test_losses.py``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def same_label_targets(
    labels: torch.Tensor | None, n: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Target distribution over a batch: uniform over the items sharing the row's label (the diagonal when
    ``labels`` is None), as ALBEF's retrieval fine-tuning does with product ids."""
    if labels is None:
        return torch.eye(n, device=device, dtype=dtype)
    pos = (labels[:, None] == labels[None, :]).to(dtype)
    return pos / pos.sum(dim=1, keepdim=True)


def focal_contrastive_rows(sim: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Per-row HNM-F loss of one direction: ``-Σ_j α (1 − p_ij)^γ log p_ij t_ij`` with ``p = softmax(sim)``."""
    log_p = F.log_softmax(sim, dim=1)
    weight = alpha * (1.0 - log_p.exp()).pow(gamma)
    return -(weight * log_p * targets).sum(dim=1)


def hnm_f_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    temp: torch.Tensor | float,
    labels: torch.Tensor | None = None,
    alpha: float = 0.5,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Fashion-FINE's HNM-F loss for L2-normalised ``image_emb`` and ``text_emb`` (B, D), row i matching row i.

    ``labels`` (B,) marks items that are the same product (every pair with equal labels is a positive);
    ``temp`` is the softmax temperature (a learnable scalar in training, clamped to [0.001, 0.5] by the caller)."""
    sim_i2t = image_emb @ text_emb.t() / temp
    targets = same_label_targets(labels, sim_i2t.shape[0], sim_i2t.device, sim_i2t.dtype)
    loss_i2t = focal_contrastive_rows(sim_i2t, targets, alpha, gamma).mean()
    loss_t2i = focal_contrastive_rows(sim_i2t.t(), targets.t(), alpha, gamma).mean()
    return 0.5 * (loss_i2t + loss_t2i)


def batch_softmax_loss(sources: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """yahoo/maaf's batch-softmax loss: ``cross_entropy(scale · sources @ targetsᵀ, diagonal)``.

    The official model multiplies both unit vectors by the learned ``NormalizationLayer`` scale, so ``scale`` is
    that scale squared."""
    dots = scale * (sources @ targets.t())
    return F.cross_entropy(dots, torch.arange(dots.shape[0], device=dots.device))


def pairwise_squared_distances(emb: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (B, B) between rows, clamped at 0 against rounding."""
    sq = (emb * emb).sum(dim=1)
    return (sq[:, None] + sq[None, :] - 2.0 * emb @ emb.t()).clamp(min=0.0)


def semi_hard_negatives(dist: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Anchors, positives and their mined negatives (index tensors) for every anchor–positive pair of the batch.

    The negative of pair (a, p) is the negative closest to ``a`` among those farther than ``p`` (semi-hard);
    when no negative is farther, the farthest negative. Pairs whose anchor has no negative are left out."""
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    anchors, positives = torch.nonzero(same & ~eye, as_tuple=True)
    neg_mask = ~same[anchors]  # (P, B): negatives of each pair's anchor
    has_neg = neg_mask.any(dim=1)
    anchors, positives, neg_mask = anchors[has_neg], positives[has_neg], neg_mask[has_neg]
    d_an = dist[anchors]  # (P, B)
    d_ap = dist[anchors, positives][:, None]
    inf = torch.finfo(dist.dtype).max
    outside = neg_mask & (d_an > d_ap)
    closest_outside = torch.where(outside, d_an, torch.full_like(d_an, inf)).argmin(dim=1)
    farthest = torch.where(neg_mask, d_an, torch.full_like(d_an, -inf)).argmax(dim=1)
    negatives = torch.where(outside.any(dim=1), closest_outside, farthest)
    return anchors, positives, negatives


def semi_hard_triplet_loss(emb: torch.Tensor, labels: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """Triplet loss ``mean(max(d(a,p) − d(a,n) + margin, 0))`` over every anchor–positive pair of the batch, on
    squared Euclidean distances, with the negative mined online by :func:`semi_hard_negatives` (the mining sees
    no gradient, as in FaceNet). A batch without any anchor–positive pair is an error: sample several items per
    label (see :class:`fine_infer.tools.train.data.TrainData`)."""
    dist = pairwise_squared_distances(emb)
    with torch.no_grad():
        a, p, n = semi_hard_negatives(dist.detach(), labels)
    if len(a) == 0:
        raise ValueError("semi-hard triplet loss needs a batch with at least one anchor-positive pair and a negative")
    return F.relu(dist[a, p] - dist[a, n] + margin).mean()


def multi_head_cross_entropy(logits: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over attribute heads of the mean cross-entropy of each head's logits against its labels."""
    if len(logits) != len(targets):
        raise ValueError(f"{len(logits)} heads of logits but {len(targets)} label tensors")
    return sum(F.cross_entropy(z, y) for z, y in zip(logits, targets))


__all__ = [
    "batch_softmax_loss",
    "focal_contrastive_rows",
    "hnm_f_loss",
    "multi_head_cross_entropy",
    "pairwise_squared_distances",
    "same_label_targets",
    "semi_hard_negatives",
    "semi_hard_triplet_loss",
]
