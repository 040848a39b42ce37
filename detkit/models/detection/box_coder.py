"""Box coding: ``(dx, dy, dw, dh)`` regression targets between boxes and reference boxes (anchors/proposals)."""

from __future__ import annotations

import math
from typing import Sequence

import torch

#: Default clamp on dw/dh before ``exp``: a box may grow at most 1000/16 times its reference (as torchvision).
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


class BoxCoder:
    """Encodes boxes relative to reference boxes and decodes deltas back; ``decode(encode(b, r), r) == b``.

    ``dx = wx * (cx - cx_r) / w_r``, ``dy = wy * (cy - cy_r) / h_r``, ``dw = ww * log(w / w_r)``,
    ``dh = wh * log(h / h_r)``; all boxes ``xyxy``. Any leading dimensions broadcast.

    Args:
        weights: ``(wx, wy, ww, wh)``; ``(1, 1, 1, 1)`` for the RPN and ``(10, 10, 5, 5)`` for RoI heads, as usual.
        scale_clamp: upper clamp on ``dw/ww`` and ``dh/wh`` before ``exp``.
    """

    def __init__(self, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                 scale_clamp: float = DEFAULT_SCALE_CLAMP) -> None:
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = scale_clamp

    @staticmethod
    def _centre_size(boxes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        w = boxes[..., 2] - boxes[..., 0]
        h = boxes[..., 3] - boxes[..., 1]
        return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h

    def encode(self, boxes: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """``boxes [..., 4], reference [..., 4] -> float32 deltas [..., 4]``. Sizes are floored at a tiny epsilon
        so degenerate boxes give large but finite targets, never NaN. Computed in float32 whatever the autocast
        dtype (see :meth:`decode`)."""
        wx, wy, ww, wh = self.weights
        eps = 1e-6
        with torch.autocast(boxes.device.type, enabled=False):
            cx, cy, w, h = self._centre_size(boxes.float())
            rcx, rcy, rw, rh = self._centre_size(reference.float())
            rw, rh = rw.clamp(min=eps), rh.clamp(min=eps)
            return torch.stack((wx * (cx - rcx) / rw, wy * (cy - rcy) / rh,
                                ww * torch.log(w.clamp(min=eps) / rw), wh * torch.log(h.clamp(min=eps) / rh)), dim=-1)

    def decode(self, deltas: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """``deltas [..., 4], reference [..., 4] -> float32 boxes [..., 4]`` (xyxy absolute pixels).

        Always float32, with autocast disabled: under mixed precision the head's deltas arrive in fp16/bf16, and
        decoding in that dtype rounds a coordinate near x=600 to the nearest 0.5 px (fp16) or 4 px (bf16), which
        then ties scores and shifts every evaluated box. ``dw``/``dh`` are clamped at ``scale_clamp`` from above
        (as torchvision) and non-finite deltas decode to non-finite boxes that callers mask as invalid.
        """
        wx, wy, ww, wh = self.weights
        with torch.autocast(deltas.device.type, enabled=False):
            deltas = deltas.float()
            rcx, rcy, rw, rh = self._centre_size(reference.float())
            dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
            dw = (deltas[..., 2] / ww).clamp(max=self.scale_clamp)
            dh = (deltas[..., 3] / wh).clamp(max=self.scale_clamp)
            cx, cy = dx * rw + rcx, dy * rh + rcy
            w, h = torch.exp(dw) * rw, torch.exp(dh) * rh
            return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)
