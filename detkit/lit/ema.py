"""Exponential moving average of model weights (as in YOLOv5/YOLOX), used for evaluation and export."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn


class ModelEMA(nn.Module):
    """Keeps ``ema = d * ema + (1 - d) * weights`` after each optimiser step, with a ramp
    ``d = decay * (1 - exp(-updates / ramp))`` so early, fast-changing weights are not over-smoothed.
    Buffers (BatchNorm statistics) are copied as they are. The EMA copy never receives gradients.

    One update is two fused multi-tensor kernels (``torch._foreach_lerp_`` over the floating-point tensors,
    ``torch._foreach_copy_`` over the rest) on tensor lists gathered once, and the update counter lives on the host
    (saved with the module's state), so an update never waits for the GPU.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9998, ramp: float = 2000.0) -> None:
        super().__init__()
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.ramp = decay, ramp
        self.updates = 0
        self._pairs: tuple[list[torch.Tensor], ...] | None = None
        self._signature: tuple | None = None

    def _tensor_lists(self, model: nn.Module) -> tuple[list[torch.Tensor], ...]:
        """``(ema floats, model floats, ema others, model others)``, matched by state-dict key; cached while the
        two models keep their storage (the optimiser updates in place; ``.to(device)`` replaces storage)."""
        signature = (id(model), next(model.parameters()).data_ptr(), next(self.module.parameters()).data_ptr())
        if self._pairs is None or self._signature != signature:
            ema_state, state = self.module.state_dict(), model.state_dict()
            floats = [k for k, v in ema_state.items() if v.dtype.is_floating_point]
            others = [k for k, v in ema_state.items() if not v.dtype.is_floating_point]
            self._pairs = ([ema_state[k] for k in floats], [state[k].detach() for k in floats],
                           [ema_state[k] for k in others], [state[k] for k in others])
            self._signature = signature
        return self._pairs

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        """One update; ``decay`` replaces the ramped decay for this update (0 copies the weights)."""
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.ramp)) if decay is None else float(decay)
        ema_f, model_f, ema_o, model_o = self._tensor_lists(model)
        torch._foreach_lerp_(ema_f, model_f, 1.0 - d)  # ema + (1 - d) * (w - ema) = d * ema + (1 - d) * w
        if ema_o:
            torch._foreach_copy_(ema_o, model_o)

    def get_extra_state(self) -> Any:
        return {"updates": self.updates}

    def set_extra_state(self, state: Any) -> None:
        self.updates = int(state["updates"])
        self._pairs = None
