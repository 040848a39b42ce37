"""Batched box geometry on ``xyxy`` absolute-pixel boxes (leading batch dimensions allowed)."""

from __future__ import annotations

import torch


def wh_area(wh: torch.Tensor) -> torch.Tensor:
    """``[..., 2]`` widths and heights -> ``[...]`` areas, as the product of the two columns. Not ``prod(-1)``:
    ``prod``'s backward reads ``(input == 0).sum().item()`` to choose its formula, a host synchronisation per call
    on a GPU (it was two per YOLO step; ``tests/test_host_sync.py`` sees it)."""
    return wh[..., 0] * wh[..., 1]


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
        inter = wh_area((rb - lt).clamp(min=0))
        union = box_area(boxes1)[..., :, None] + box_area(boxes2)[..., None, :] - inter
        return inter / union.clamp(min=torch.finfo(union.dtype).eps)


def clip_boxes(boxes: torch.Tensor, height: int | torch.Tensor, width: int | torch.Tensor) -> torch.Tensor:
    """Clip ``[..., 4]`` xyxy boxes to ``[0, width] x [0, height]``; tensor bounds broadcast against
    ``boxes[..., 0]`` (e.g. ``[B, 1]`` per image for ``[B, K, 4]`` boxes)."""
    if isinstance(width, torch.Tensor) or isinstance(height, torch.Tensor):
        w = torch.as_tensor(width, dtype=boxes.dtype, device=boxes.device)[..., None]
        h = torch.as_tensor(height, dtype=boxes.dtype, device=boxes.device)[..., None]
        x = torch.minimum(boxes[..., 0::2].clamp(min=0), w)
        y = torch.minimum(boxes[..., 1::2].clamp(min=0), h)
    else:
        x = boxes[..., 0::2].clamp(min=0, max=width)
        y = boxes[..., 1::2].clamp(min=0, max=height)
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


def small_boxes(boxes: torch.Tensor, min_size: float) -> torch.Tensor:
    """Mask ``[...]`` of boxes whose width or height is below ``min_size``."""
    return ((boxes[..., 2] - boxes[..., 0]) < min_size) | ((boxes[..., 3] - boxes[..., 1]) < min_size)


def finite_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """Mask ``[...]`` of boxes whose four coordinates are finite (a diverging head decodes to inf/NaN)."""
    return torch.isfinite(boxes).all(dim=-1)
