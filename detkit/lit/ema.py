"""Exponential moving average of model weights (as in YOLOv5/YOLOX), used for evaluation and export."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


class ModelEMA(nn.Module):
    """Keeps ``ema = d * ema + (1 - d) * weights`` after each optimiser step, with a ramp
    ``d = decay * (1 - exp(-updates / ramp))`` so early, fast-changing weights are not over-smoothed.
    Buffers (BatchNorm statistics) are copied as they are. The EMA copy never receives gradients."""

    def __init__(self, model: nn.Module, decay: float = 0.9998, ramp: float = 2000.0) -> None:
        super().__init__()
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.ramp = decay, ramp
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-int(self.updates) / self.ramp))
        ema_state, state = self.module.state_dict(), model.state_dict()
        for k, v in ema_state.items():
            if v.dtype.is_floating_point:
                v.mul_(d).add_(state[k].detach().to(v.dtype), alpha=1 - d)
            else:
                v.copy_(state[k])
