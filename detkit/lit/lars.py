"""LARS: layer-wise adaptive rate scaling (You et al., 2017), the optimiser of the SimCLR paper for large batches.

SGD with momentum in which each parameter tensor's step is scaled by a trust ratio
``eta * ||w|| / (||g|| + weight_decay * ||w||)``, so every layer moves by a similar fraction of its own norm.
As in SimCLR, 1-d tensors (BatchNorm weights and biases, biases: those :func:`detkit.lit.optim.param_groups` also
keeps out of weight decay) are excluded from the adaptation and take plain SGD-momentum steps. Adaptation is its own
setting, independent of the weight decay: with ``weight_decay=0`` the weight matrices still adapt. A group's
``lars`` key (true/false) overrides the rule for all its tensors.
Swap it in for pretraining with ``model.optimizer._target_=detkit.lit.lars.LARS`` (same arguments as SGD, plus
``trust_coefficient``).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch.optim import Optimizer


class LARS(Optimizer):
    """Args:
        params: parameters or parameter groups; a tensor adapts when ``group.get("lars", tensor.ndim > 1)``.
        lr, momentum, weight_decay, nesterov: as ``torch.optim.SGD``.
        trust_coefficient: ``eta`` of the trust ratio (0.001 in the LARS and SimCLR papers).
        eps: added to the denominator.
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, nesterov: bool = False, eps: float = 1e-8) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0:
            raise ValueError(f"LARS: invalid lr={lr}, momentum={momentum}, weight_decay={weight_decay} or "
                             f"trust_coefficient={trust_coefficient}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, nesterov=nesterov, eps=eps))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, momentum = group["weight_decay"], group["momentum"]
            # A loop over parameter tensors (not over elements), as in torch.optim.SGD's reference path.
            for p in group["params"]:
                if p.grad is None:
                    continue
                d_p = p.grad
                if group.get("lars", p.ndim > 1):
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d_p)
                    trust = torch.where((w_norm > 0) & (g_norm > 0),
                                        group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm + group["eps"]),
                                        torch.ones_like(w_norm))
                    d_p = (d_p + wd * p) * trust if wd else d_p * trust
                elif wd:
                    d_p = d_p + wd * p
                if momentum:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d_p.clone()
                    else:
                        buf.mul_(momentum).add_(d_p)
                    d_p = d_p.add(buf, alpha=momentum) if group["nesterov"] else buf
                p.add_(d_p, alpha=-group["lr"])
        return loss
