"""IoU matching of reference boxes (anchors or proposals) to ground-truth boxes, batched over images."""

from __future__ import annotations

import torch


class Matcher:
    """Assigns each reference box the ground-truth box it overlaps most, with foreground/background thresholds.

    Output codes per reference box: ``>= 0`` the matched ground-truth index (foreground, IoU >= ``high``),
    :attr:`BACKGROUND` (``-1``, IoU < ``low``), :attr:`IGNORE` (``-2``, in between).

    Args:
        high: foreground threshold (0.7 for the RPN, 0.5 for RoI heads).
        low: background threshold (0.3 for the RPN; equal to ``high`` for RoI heads: no ignore band).
        allow_low_quality_matches: also keep, for each ground-truth box, the reference boxes with its highest IoU
            (so a box that no anchor overlaps 0.7 still gets one), as in Faster R-CNN. A ground truth whose best
            IoU is 0 gets none (torchvision would then mark every non-overlapping anchor foreground).
    """

    BACKGROUND = -1
    IGNORE = -2

    def __init__(self, high: float, low: float, allow_low_quality_matches: bool = False) -> None:
        if low > high:
            raise ValueError(f"Matcher needs low <= high, got low={low}, high={high}")
        self.high, self.low = high, low
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, iou: torch.Tensor, gt_valid: torch.Tensor) -> torch.Tensor:
        """Match, batched and fixed-shape (``torch.where``, no boolean-mask assignment).

        Args:
            iou: ``[B, G, A]`` IoU of ``G`` (padded) ground-truth boxes with ``A`` reference boxes.
            gt_valid: ``[B, G]`` bool, False for padding rows (images with fewer boxes, or none).

        Returns:
            ``[B, A]`` int64 match codes as described in the class docstring.
        """
        iou = iou.masked_fill(~gt_valid[..., None], -1.0)
        best, best_gt = iou.max(dim=1)  # [B, A]
        code = torch.where(best < self.low, self.BACKGROUND, self.IGNORE)
        matches = torch.where(best >= self.high, best_gt, code)
        if self.allow_low_quality_matches:
            highest = iou.max(dim=2, keepdim=True).values  # [B, G, 1]
            is_best = (iou == highest) & gt_valid[..., None] & (highest > 0)
            matches = torch.where(is_best.any(dim=1), best_gt, matches)
        return matches
