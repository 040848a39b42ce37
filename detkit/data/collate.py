"""Batching for detection: images padded to one size, ground truth padded once into one fixed-shape type.

A batch is ``(images uint8 [B, 3, H, W], Targets)``. Every detector's ``loss`` takes :class:`~detkit.structures.Targets`
as they come from here (no per-image lists inside a training step). ``Targets`` (in :mod:`detkit.structures`, the
floor below data and models) is a named tuple of tensors, so the data loader pins it (``pin_memory=True``) and
Lightning moves it to the device with ``non_blocking=True`` as it does a tensor.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from detkit.data.transforms import PAD_VALUE
from detkit.structures import BOX_PAD_MULTIPLE, Targets, as_targets  # noqa: F401  (re-exported: their former home)


def pad_images(images: Sequence[torch.Tensor], divisor: int = 32, value: int = PAD_VALUE) -> torch.Tensor:
    """Stack ``[3, H_i, W_i]`` images into ``[B, 3, H, W]``, padding bottom/right to a multiple of ``divisor``."""
    h = max(im.shape[-2] for im in images)
    w = max(im.shape[-1] for im in images)
    h, w = -(-h // divisor) * divisor, -(-w // divisor) * divisor
    batch = images[0].new_full((len(images), images[0].shape[0], h, w), value)
    for out, im in zip(batch, images):  # one copy per image: sizes differ, there is no batched kernel for this
        out[:, : im.shape[-2], : im.shape[-1]].copy_(im)
    return batch


def detection_collate(batch: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[torch.Tensor, Targets]:
    """``[(image uint8 [3, H, W], target dict), ...] -> (images uint8 [B, 3, H', W'], Targets)``."""
    images, targets = zip(*batch)
    return pad_images(images), Targets.from_list(targets)
