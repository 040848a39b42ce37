"""Balanced sampling of positive and negative training examples: a fixed number per image, by sorting."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Samples(NamedTuple):
    """``S`` sampled examples per image, positives first: ``index [B, S]`` into the candidates, ``positive [B, S]``
    and ``valid [B, S]`` (False where an image has fewer than ``S`` usable candidates; such slots point at an
    arbitrary candidate and must be masked out of every loss)."""

    index: torch.Tensor
    positive: torch.Tensor
    valid: torch.Tensor


class BalancedSampler:
    """Samples exactly ``batch_size_per_image`` slots per image: up to ``positive_fraction`` of them positives,
    the rest negatives (torchvision's rule: ``num_neg = batch_size_per_image - num_pos``), each drawn uniformly at
    random; slots left over when an image lacks candidates are marked invalid.

    Fixed-shape, with no host synchronisation: each candidate gets a random key, positives beyond the positive
    budget are dropped by one top-k, and one more top-k over keys that rank chosen positives above negatives above
    everything else picks the slots. The heads then always see ``B x batch_size_per_image`` examples.

    Args:
        batch_size_per_image: 256 for the RPN, 512 for RoI heads, as in Faster R-CNN.
        positive_fraction: 0.5 for the RPN, 0.25 for RoI heads.
    """

    def __init__(self, batch_size_per_image: int, positive_fraction: float) -> None:
        if batch_size_per_image < 1 or not 0.0 <= positive_fraction <= 1.0:
            raise ValueError(f"sampler needs batch_size_per_image >= 1 and positive_fraction in [0, 1], got "
                             f"{batch_size_per_image}, {positive_fraction}")
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction

    def __call__(self, positive: torch.Tensor, negative: torch.Tensor,
                 generator: torch.Generator | None = None) -> Samples:
        """``positive, negative: [B, N] bool`` (disjoint) -> :class:`Samples` with ``S = min(batch_size_per_image,
        N)`` slots per image. The draws come from ``generator``, or from torch's global RNG when it is None (what
        a ``torch.compile``d loss uses: a Generator object cannot be traced and would break the graph)."""
        n = positive.shape[1]
        size = min(self.batch_size_per_image, n)
        max_pos = min(int(self.batch_size_per_image * self.positive_fraction), n)
        # No generator keyword when there is none: rand's generator overload takes no symbolic size, and a compiled
        # step whose padded box count varies traces this with a symbolic N.
        drawn_from = {} if generator is None else {"generator": generator}
        noise = torch.rand(positive.shape, device=positive.device, **drawn_from)
        chosen = torch.zeros_like(positive)
        if max_pos > 0:  # the positive budget: the max_pos positives with the highest noise
            pos_key = torch.where(positive, noise, torch.full_like(noise, -1.0))
            top = pos_key.topk(max_pos, dim=1)
            chosen.scatter_(1, top.indices, top.values >= 0)
        # chosen positives rank in [2, 3), negatives in [0, 1), everything else -1: one top-k picks the slots
        key = torch.where(chosen, noise + 2, torch.where(negative, noise, torch.full_like(noise, -1.0)))
        top = key.topk(size, dim=1)
        return Samples(top.indices, top.values >= 2, top.values >= 0)
