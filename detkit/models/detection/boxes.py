"""Batched box geometry on ``xyxy`` absolute-pixel boxes (leading batch dimensions allowed)."""

from __future__ import annotations

import torch


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """``[..., 4] xyxy -> [...]`` area (0 for degenerate boxes)."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def batched_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU of every pair, batched: ``[B, N, 4] x [B, M, 4] -> [B, N, M]``.

    Equals ``torchvision.ops.box_iou`` per batch element (which has no batch dimension); degenerate boxes give 0,
    never NaN. Always float32 (autocast disabled): IoUs decide matches and scores, and half precision ties them.
    """
    with torch.autocast(boxes1.device.type, enabled=False):
        boxes1, boxes2 = boxes1.float(), boxes2.float()
        lt = torch.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
        rb = torch.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
        inter = (rb - lt).clamp(min=0).prod(-1)
        union = box_area(boxes1)[..., :, None] + box_area(boxes2)[..., None, :] - inter
        return inter / union.clamp(min=torch.finfo(union.dtype).eps)


def clip_boxes(boxes: torch.Tensor, height: int | torch.Tensor, width: int | torch.Tensor) -> torch.Tensor:
    """Clip ``[..., 4]`` xyxy boxes to ``[0, width] x [0, height]``."""
    x = boxes[..., 0::2].clamp(min=0, max=width)
    y = boxes[..., 1::2].clamp(min=0, max=height)
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


def small_boxes(boxes: torch.Tensor, min_size: float) -> torch.Tensor:
    """Mask ``[...]`` of boxes whose width or height is below ``min_size``."""
    return ((boxes[..., 2] - boxes[..., 0]) < min_size) | ((boxes[..., 3] - boxes[..., 1]) < min_size)


def pad_targets(targets: list[dict], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack per-image targets into padded tensors.

    Returns ``boxes [B, G, 4]`` (xyxy), ``labels [B, G]`` (int64) and ``valid [B, G]`` (bool), with
    ``G = max(1, max_i N_i)`` so that images without boxes still have a (fully invalid) row.
    """
    g = max([1] + [len(t["boxes"]) for t in targets])
    boxes = torch.zeros(len(targets), g, 4, device=device)
    labels = torch.zeros(len(targets), g, dtype=torch.int64, device=device)
    valid = torch.zeros(len(targets), g, dtype=torch.bool, device=device)
    for i, t in enumerate(targets):  # a copy per image: the number of boxes differs per image
        n = len(t["boxes"])
        boxes[i, :n] = t["boxes"].to(device)
        labels[i, :n] = t["labels"].to(device)
        valid[i, :n] = True
    return boxes, labels, valid
