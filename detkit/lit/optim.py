"""Optimiser parameter groups and learning-rate schedules shared by pretraining and detection."""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float,
                 lr: float, lr_mults: dict[str, float] | None = None) -> list[dict]:
    """Split trainable parameters into groups: no weight decay on norm and bias parameters (every tensor with
    ``ndim <= 1``), and a learning-rate multiplier per name prefix (e.g. ``{"backbone.encoder.": 0.1}``)."""
    lr_mults = lr_mults or {}
    groups: dict[tuple[float, float], list] = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        mult = next((m for prefix, m in lr_mults.items() if name.startswith(prefix)), 1.0)
        wd = 0.0 if p.ndim <= 1 else weight_decay
        groups.setdefault((mult, wd), []).append(p)
    return [{"params": ps, "lr": lr * mult, "weight_decay": wd} for (mult, wd), ps in groups.items()]


def total_training_steps(trainer) -> int:
    """Optimiser steps of the whole run, computed from the data module.

    ``trainer.estimated_stepping_batches`` would give the same number, but calling it from ``configure_optimizers``
    makes Lightning build the training loader before a checkpoint's loop state is restored, and a resumed run then
    silently restarts its epoch from the first batch instead of continuing mid-epoch.
    """
    if trainer.max_steps and trainer.max_steps > 0:
        return int(trainer.max_steps)
    batches = math.ceil(len(trainer.datamodule.train_dataloader()) / max(1, trainer.world_size))
    limit = trainer.limit_train_batches
    if isinstance(limit, int):
        batches = min(batches, limit)
    elif limit is not None:
        batches = int(batches * float(limit))
    return max(1, batches // max(1, trainer.accumulate_grad_batches) * max(1, trainer.max_epochs))


class WarmupSchedule:
    """Per-step learning-rate factor: linear warm-up, then cosine decay or step decay.

    Args:
        kind: ``"cosine"`` (to ``min_ratio`` at the last step), ``"step"`` (times ``gamma`` at each milestone,
            given as fractions of training) or ``"constant"``.
        warmup: warm-up length, in steps if >= 1, else as a fraction of all steps.
        warmup_factor: factor at step 0.
    """

    def __init__(self, kind: str = "cosine", warmup: float = 0.05, warmup_factor: float = 0.001,
                 min_ratio: float = 0.0, milestones: tuple[float, ...] = (0.67, 0.89), gamma: float = 0.1) -> None:
        if kind not in ("cosine", "step", "constant"):
            raise ValueError(f"schedule kind must be 'cosine', 'step' or 'constant', got {kind!r}")
        self.kind, self.warmup, self.warmup_factor = kind, warmup, warmup_factor
        self.min_ratio, self.milestones, self.gamma = min_ratio, tuple(milestones), gamma

    def factor_fn(self, total_steps: int) -> Callable[[int], float]:
        total = max(1, int(total_steps))
        warm = int(self.warmup if self.warmup >= 1 else self.warmup * total)

        def factor(step: int) -> float:
            if step < warm:
                alpha = step / max(1, warm)
                base = self.warmup_factor * (1 - alpha) + alpha
            else:
                base = 1.0
            progress = min(1.0, step / total)
            if self.kind == "cosine":
                after = (step - warm) / max(1, total - warm)
                decay = self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, after)))
            elif self.kind == "step":
                decay = self.gamma ** sum(progress >= m for m in self.milestones)
            else:
                decay = 1.0
            return base * decay

        return factor

    def build(self, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, self.factor_fn(total_steps))
