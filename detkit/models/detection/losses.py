"""Loss functions shared by the detectors."""

from __future__ import annotations

import torch
import torch.nn.functional as F

BOX_LOSSES = ("smooth_l1", "l1")


def box_regression_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "smooth_l1",
                        beta: float = 1.0 / 9) -> torch.Tensor:
    """Summed regression loss over ``[N, 4]`` deltas (the caller normalises, e.g. by the sampled count).

    ``kind`` is ``"smooth_l1"`` (Huber with transition ``beta``, as Faster R-CNN) or ``"l1"``. Computed in
    float32 whatever the autocast dtype.
    """
    pred, target = pred.float(), target.float()
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target, beta=beta, reduction="sum")
    if kind == "l1":
        return F.l1_loss(pred, target, reduction="sum")
    raise ValueError(f"box loss must be one of {BOX_LOSSES}, got {kind!r}")
