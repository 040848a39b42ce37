"""Mosaic augmentation (YOLOv4/v5): four training images tiled 2x2 into one, boxes moved with their tiles."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from detkit.data.transforms import item_seed


class Mosaic(Dataset):
    """Wraps a detection dataset whose items are ``size x size`` letterboxed training images.

    With probability ``p`` an item becomes a mosaic of itself and three random other items: each is downscaled by
    2 and placed in one quadrant, so the output keeps the ``size x size`` shape; boxes are halved and offset, and
    those smaller than ``min_size`` pixels afterwards are dropped with their labels. ``image_id`` and the mapping
    keys are those of the first image (mosaics are for training only).
    """

    def __init__(self, dataset: Dataset, p: float = 0.5, min_size: float = 2.0) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"mosaic probability must be in [0, 1], got {p}")
        self.dataset, self.p, self.min_size = dataset, p, min_size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:  # categories, coco_data, records ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def _tile(self, index: int, seed: int | None) -> tuple[torch.Tensor, dict]:
        item = getattr(self.dataset, "item", None)
        return item(index, seed) if item is not None and seed is not None else self.dataset[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        seed = item_seed(index)
        g = torch.Generator().manual_seed(seed) if seed is not None else None  # see item_seed
        if self.p == 0 or torch.rand((), generator=g) >= self.p:
            return self.dataset[index]
        others = torch.randint(len(self.dataset), (3,), generator=g).tolist()
        # Each tile draws its own augmentation (seed of this item and the tile's place): read through
        # dataset[i], a tile would repeat item i's own view of this epoch, and an image drawn twice would give
        # two identical tiles.
        items = [self._tile(i, None if seed is None else hash((seed, k)) % 2**32)
                 for k, i in enumerate([index, *others])]
        _, h, w = items[0][0].shape
        canvas = torch.empty_like(items[0][0])
        boxes, labels = [], []
        for k, (image, target) in enumerate(items):
            oy, ox = (k // 2) * (h // 2), (k % 2) * (w // 2)
            small = F.interpolate(image[None].float(), size=(h // 2, w // 2), mode="bilinear", antialias=True,
                                  align_corners=False)[0]
            canvas[:, oy:oy + h // 2, ox:ox + w // 2] = small.round().clamp(0, 255).to(canvas.dtype)
            b = target["boxes"] / 2 + torch.tensor([ox, oy, ox, oy], dtype=torch.float32)
            keep = ((b[:, 2] - b[:, 0]) >= self.min_size) & ((b[:, 3] - b[:, 1]) >= self.min_size)
            boxes.append(b[keep])
            labels.append(target["labels"][keep])
        target = {**items[0][1], "boxes": torch.cat(boxes), "labels": torch.cat(labels)}
        return canvas, target
