"""Balanced sampling of positive and negative training examples, batched over images."""

from __future__ import annotations

import torch


def _random_rank(mask: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A uniformly random order among the True entries of each row: ``[B, N] -> [B, N]`` int64 ranks
    (0..count-1 for True entries, >= count for False ones)."""
    keys = torch.rand(mask.shape, device=mask.device, generator=generator)
    keys = keys.masked_fill(~mask, 2.0)  # False entries sort last
    order = keys.argsort(dim=1)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(mask.shape[1], device=mask.device).expand_as(order))
    return ranks


class BalancedSampler:
    """Samples ``batch_size_per_image`` examples per image with at most ``positive_fraction`` positives; the rest
    are negatives (fewer when an image lacks enough of either). Fully vectorised over the batch.

    Args:
        batch_size_per_image: 256 for the RPN, 512 for RoI heads, as in Faster R-CNN.
        positive_fraction: 0.5 for the RPN, 0.25 for RoI heads.
    """

    def __init__(self, batch_size_per_image: int, positive_fraction: float) -> None:
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction

    def __call__(self, positive: torch.Tensor, negative: torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``positive, negative: [B, N] bool -> (sampled_positive, sampled_negative) [B, N] bool``."""
        max_pos = int(self.batch_size_per_image * self.positive_fraction)
        num_pos = positive.sum(dim=1, keepdim=True).clamp(max=max_pos)
        num_neg = negative.sum(dim=1, keepdim=True).clamp(max=self.batch_size_per_image - num_pos)
        pos = positive & (_random_rank(positive, generator) < num_pos)
        neg = negative & (_random_rank(negative, generator) < num_neg)
        return pos, neg
