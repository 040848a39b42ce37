"""Batching for detection: images padded to one size, a variable number of boxes per image (empty included)."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from detkit.data.transforms import PAD_VALUE


def pad_images(images: Sequence[torch.Tensor], divisor: int = 32, value: int = PAD_VALUE) -> torch.Tensor:
    """Stack ``[3, H_i, W_i]`` images into ``[B, 3, H, W]``, padding bottom/right to a multiple of ``divisor``."""
    h = max(im.shape[-2] for im in images)
    w = max(im.shape[-1] for im in images)
    h, w = -(-h // divisor) * divisor, -(-w // divisor) * divisor
    batch = images[0].new_full((len(images), images[0].shape[0], h, w), value)
    for out, im in zip(batch, images):  # one copy per image: sizes differ, there is no batched kernel for this
        out[:, : im.shape[-2], : im.shape[-1]].copy_(im)
    return batch


def detection_collate(batch: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[torch.Tensor, list[dict]]:
    """``[(image uint8 [3, H, W], target), ...] -> (images uint8 [B, 3, H', W'], [target, ...])``."""
    images, targets = zip(*batch)
    return pad_images(images), list(targets)
