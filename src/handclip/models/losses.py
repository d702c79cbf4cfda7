"""Losses of the opt-in recipes: the batch-hard triplet loss (Hermans et al. 2017, as in the re-ID bag of tricks)."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def pairwise_distances(features: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between the rows of ``features`` (float32), with a gradient also at distance 0."""
    x = features.float()
    squared = x.pow(2).sum(1)
    dist = squared[:, None] + squared[None, :] - 2 * x @ x.T
    return dist.clamp(min=1e-12).sqrt()


def batch_hard_triplet_loss(features: torch.Tensor, labels: torch.Tensor, margin: float = 0.3,
                            soft: bool = False) -> torch.Tensor:
    """Batch-hard triplet loss: for each anchor, its farthest positive against its closest negative.

    ``max(0, d(a, p_hardest) - d(a, n_hardest) + margin)``, or ``softplus(d(a, p) - d(a, n))`` with ``soft``
    (the soft margin), averaged over the anchors that have a positive (another image of the same identity in the
    batch) and a negative. Distances are Euclidean, on the features as given (not L2-normalised). A batch without
    any such anchor gives 0 (with a gradient of zeros). No host synchronisation.
    """
    dist = pairwise_distances(features)
    same = labels[:, None] == labels[None, :]
    positive = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    negative = ~same
    valid = positive.any(1) & negative.any(1)
    hardest_positive = dist.masked_fill(~positive, 0.0).amax(1)
    hardest_negative = dist.masked_fill(~negative, float("inf")).amin(1)
    gap = torch.where(valid, hardest_positive - hardest_negative, torch.zeros_like(hardest_positive))
    per_anchor = F.softplus(gap) if soft else F.relu(gap + margin)
    return (per_anchor * valid).sum() / valid.sum().clamp(min=1)
