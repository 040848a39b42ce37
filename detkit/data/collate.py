"""Batching for detection: images padded to one size, ground truth padded once into one fixed-shape type.

A batch is ``(images uint8 [B, 3, H, W], Targets)``. Every detector's ``loss`` takes :class:`Targets` as they come
from here (no per-image lists inside a training step). ``Targets`` is a named tuple of tensors, so the data loader
pins it (``pin_memory=True``) and Lightning moves it to the device with ``non_blocking=True`` as it does a tensor.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch

from detkit.data.transforms import PAD_VALUE

#: The box dimension ``G`` of :class:`Targets` is padded to a multiple of this, so that the shapes a compiled model
#: sees come from a small set (``torch.compile`` specialises on shapes).
BOX_PAD_MULTIPLE = 8


class Targets(NamedTuple):
    """Padded ground truth of a batch of ``B`` images with at most ``G`` boxes each.

    Attributes:
        boxes: ``float32 [B, G, 4]`` ``xyxy`` in input (letterboxed) pixels; padding rows are zeros.
        labels: ``int64 [B, G]`` contiguous labels ``0..C-1``; padding rows are 0.
        valid: ``bool [B, G]``, False for padding (an image without objects has no valid row).
        image_ids: ``int64 [B]`` original COCO image ids (-1 when unknown).
        orig_sizes: ``int64 [B, 2]`` original ``(height, width)``.
        scales: ``float32 [B]`` input pixels per original pixel (letterbox factor; padding is bottom/right).
    """

    boxes: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor
    image_ids: torch.Tensor
    orig_sizes: torch.Tensor
    scales: torch.Tensor

    @classmethod
    def from_list(cls, targets: Sequence[dict[str, Any]], pad_multiple: int = BOX_PAD_MULTIPLE,
                  device: torch.device | str | None = None) -> "Targets":
        """Pad per-image dicts (``boxes [N_i, 4]``, ``labels [N_i]``, optional ``image_id``, ``orig_size``,
        ``scale``) once. ``G = max_i N_i`` rounded up to ``pad_multiple`` (at least ``pad_multiple``)."""
        b = len(targets)
        most = max([0] + [len(t["boxes"]) for t in targets])
        g = max(1, -(-most // pad_multiple)) * pad_multiple
        boxes = torch.zeros(b, g, 4)
        labels = torch.zeros(b, g, dtype=torch.int64)
        valid = torch.zeros(b, g, dtype=torch.bool)
        for i, t in enumerate(targets):  # runs in the loader's collate (a worker), once per image
            n = len(t["boxes"])
            boxes[i, :n] = torch.as_tensor(t["boxes"], dtype=torch.float32).reshape(n, 4)
            labels[i, :n] = torch.as_tensor(t["labels"], dtype=torch.int64)
            valid[i, :n] = True
        image_ids = torch.tensor([int(t.get("image_id", -1)) for t in targets], dtype=torch.int64)
        orig_sizes = torch.stack([torch.as_tensor(t["orig_size"], dtype=torch.int64) if "orig_size" in t
                                  else torch.zeros(2, dtype=torch.int64) for t in targets]) if b else \
            torch.zeros(0, 2, dtype=torch.int64)
        scales = torch.tensor([float(t.get("scale", 1.0)) for t in targets], dtype=torch.float32)
        out = cls(boxes, labels, valid, image_ids, orig_sizes, scales)
        return out.to(device) if device is not None else out

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Targets":
        return Targets(*(t.to(device, non_blocking=non_blocking) for t in self))

    @property
    def num_images(self) -> int:
        return self.boxes.shape[0]

    def image(self, i: int) -> dict[str, torch.Tensor]:
        """Image ``i``'s valid boxes and labels, ``{"boxes" [n, 4], "labels" [n]}`` (tests, reports; not hot paths)."""
        keep = self.valid[i]
        return {"boxes": self.boxes[i][keep], "labels": self.labels[i][keep]}


def as_targets(targets: Targets | Sequence[dict[str, Any]], device: torch.device) -> Targets:
    """The detectors' entry point: :class:`Targets` pass through (moved to ``device``), a list of per-image dicts
    (convenient in tests and notebooks) is padded once."""
    if isinstance(targets, Targets):
        return targets.to(device)
    return Targets.from_list(targets, device=device)


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
