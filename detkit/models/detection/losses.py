"""Loss functions shared by the detectors: dense, element-wise and float32, so callers mask and normalise them.

The IoU-family losses are written with clamps instead of boolean-mask indexing (torchvision's
``generalized_box_iou_loss``/``complete_box_iou_loss`` index with masks, a host synchronisation on a GPU), and
equal torchvision's values on valid boxes (tested).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from detkit.models.detection.boxes import wh_area

BOX_LOSSES = ("smooth_l1", "l1")
IOU_LOSSES = ("giou", "ciou")


def box_regression_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "smooth_l1",
                        beta: float = 1.0 / 9) -> torch.Tensor:
    """Element-wise regression loss of ``[..., 4]`` deltas, summed over the last dimension -> ``[...]``.

    ``kind`` is ``"smooth_l1"`` (Huber with transition ``beta``, as Faster R-CNN) or ``"l1"``. Computed in
    float32 whatever the autocast dtype; the caller masks (e.g. positives only) and normalises.
    """
    pred, target = pred.float(), target.float()
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target, beta=beta, reduction="none").sum(-1)
    if kind == "l1":
        return F.l1_loss(pred, target, reduction="none").sum(-1)
    raise ValueError(f"box loss must be one of {BOX_LOSSES}, got {kind!r}")


def _iou_and_enclosure(pred: torch.Tensor, target: torch.Tensor, eps: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """IoU, union, and the enclosing box's corners of paired ``[..., 4]`` xyxy boxes."""
    area_p = (pred[..., 2] - pred[..., 0]) * (pred[..., 3] - pred[..., 1])
    area_t = (target[..., 2] - target[..., 0]) * (target[..., 3] - target[..., 1])
    lt = torch.maximum(pred[..., :2], target[..., :2])
    rb = torch.minimum(pred[..., 2:], target[..., 2:])
    inter = wh_area((rb - lt).clamp(min=0))
    union = area_p + area_t - inter
    iou = inter / (union + eps)
    return iou, union, torch.minimum(pred[..., :2], target[..., :2]), torch.maximum(pred[..., 2:], target[..., 2:])


def iou_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "giou", eps: float = 1e-7) -> torch.Tensor:
    """Element-wise GIoU (Rezatofighi et al. 2019) or CIoU (Zheng et al. 2020) loss of paired ``[..., 4]`` xyxy
    boxes -> ``[...]``, in float32. Equals torchvision's ``generalized_box_iou_loss`` / ``complete_box_iou_loss``
    with ``reduction="none"`` on valid boxes; padding pairs give finite values for the caller to mask."""
    if kind not in IOU_LOSSES:
        raise ValueError(f"IoU loss must be one of {IOU_LOSSES}, got {kind!r}")
    with torch.autocast(pred.device.type, enabled=False):
        pred, target = pred.float(), target.float()
        iou, union, c_lt, c_rb = _iou_and_enclosure(pred, target, eps)
        if kind == "giou":
            area_c = wh_area((c_rb - c_lt).clamp(min=0))
            return 1 - (iou - (area_c - union) / (area_c + eps))
        diag = (c_rb - c_lt).square().sum(-1) + eps
        centre = ((pred[..., :2] + pred[..., 2:]) - (target[..., :2] + target[..., 2:])).div(2).square().sum(-1)
        w_p, h_p = pred[..., 2] - pred[..., 0], pred[..., 3] - pred[..., 1]
        w_t, h_t = target[..., 2] - target[..., 0], target[..., 3] - target[..., 1]
        v = (4 / math.pi**2) * (torch.atan(w_t / h_t.clamp(min=eps)) - torch.atan(w_p / h_p.clamp(min=eps))).square()
        with torch.no_grad():
            alpha = v / (1 - iou + v + eps)
        return 1 - iou + centre / diag + alpha * v


def masked_mean(values: torch.Tensor, mask: torch.Tensor, count: torch.Tensor | None = None) -> torch.Tensor:
    """``sum(values * mask) / max(1, count)`` with ``count`` the mask's sum by default: a loss averaged over the
    selected elements, fixed-shape and without a host synchronisation (``count`` stays a tensor)."""
    count = mask.sum() if count is None else count
    return (values * mask).sum() / count.clamp(min=1).to(values.dtype)
