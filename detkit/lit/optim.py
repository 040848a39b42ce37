"""Optimiser parameter groups and learning-rate schedules shared by pretraining and detection."""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn

from detkit.errors import UserError


class LrMultsError(UserError, ValueError):
    """A learning-rate multiplier that names no parameter of the model, or is not a number >= 0."""


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float,
                 lr: float, lr_mults: dict[str, float] | None = None) -> list[dict]:
    """Split trainable parameters into groups: no weight decay on norm and bias parameters (every tensor with
    ``ndim <= 1``), and a learning-rate multiplier per name prefix (e.g. ``{"backbone.encoder.": 0.1}``; where
    several prefixes match a name, the longest one's)."""
    by_length = sorted((lr_mults or {}).items(), key=lambda kv: -len(kv[0]))
    groups: dict[tuple[float, float], list] = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        mult = next((float(m) for prefix, m in by_length if name.startswith(prefix)), 1.0)
        wd = 0.0 if p.ndim <= 1 else weight_decay
        groups.setdefault((mult, wd), []).append(p)
    return [{"params": ps, "lr": lr * mult, "weight_decay": wd} for (mult, wd), ps in groups.items()]


def module_lr_mults(model: nn.Module, mults: dict[str, float]) -> dict[str, float]:
    """``{module path: multiplier}`` (``"roi_heads.box_predictor"``) -> ``{parameter-name prefix: multiplier}``
    (``"roi_heads.box_predictor."``) for :func:`param_groups`, after checking that every path names at least one
    parameter of ``model`` (a misspelt path would otherwise train at the full rate without a word)."""
    names = [name for name, _ in model.named_parameters()]
    out = {}
    for path, mult in mults.items():
        prefix = str(path).strip(".") + "."
        if not any(name.startswith(prefix) for name in names):
            tops = sorted({name.split(".")[0] for name in names})
            raise LrMultsError(f"lr multiplier for {path!r}: no parameter of the {type(model).__name__} lies under "
                               f"that module path (its top-level modules: {', '.join(tops)})")
        try:
            value = float(mult)
        except (TypeError, ValueError):
            value = float("nan")
        if not value >= 0:
            raise LrMultsError(f"lr multiplier for {path!r} must be a number >= 0, got {mult!r}")
        out[prefix] = value
    return out


def total_training_steps(trainer, datamodule=None) -> int:
    """Optimiser steps of the whole run, counted as Lightning takes them, computed from the data module.

    Per process, an epoch has ``floor(ceil(N / W) / B)`` batches (``drop_last``) or ``ceil(ceil(N / W) / B)`` (the
    loader is given a distributed sampler of ``ceil(N / W)`` items under DDP), then ``limit_train_batches``; the
    optimiser steps after every ``accumulate_grad_batches`` batches and after the epoch's last one. With both
    ``max_steps`` and ``max_epochs`` set, the run ends at whichever comes first.

    ``trainer.estimated_stepping_batches`` would give the same number, but calling it from ``configure_optimizers``
    makes Lightning build the training loader before a checkpoint's loop state is restored, and a resumed run then
    silently restarts its epoch from the first batch instead of continuing mid-epoch.
    """
    max_steps = int(trainer.max_steps or -1)
    max_epochs = trainer.max_epochs
    if max_steps > 0 and (max_epochs is None or max_epochs < 0):
        return max_steps
    datamodule = datamodule if datamodule is not None else trainer.datamodule
    loader = datamodule.train_dataloader()
    if isinstance(loader, dict):  # self-training: the unlabeled loader follows the labeled one's length
        loader = loader["labeled"]
    world = max(1, trainer.world_size)
    if loader.batch_size is not None and world > 1:
        per_rank = math.ceil(len(loader.sampler) / world)
        batches = per_rank // loader.batch_size if loader.drop_last else math.ceil(per_rank / loader.batch_size)
    else:
        batches = len(loader)
    limit = trainer.limit_train_batches
    if isinstance(limit, int):
        batches = min(batches, limit)
    elif limit is not None:
        batches = int(batches * float(limit))
    # Lightning steps the optimiser after every ``accumulate`` batches and after the epoch's last batch, even when
    # the last group is incomplete: ceil, not floor (10 batches, accumulate 4: steps after batches 4, 8 and 10).
    total = max(1, math.ceil(batches / max(1, trainer.accumulate_grad_batches)) * max(1, max_epochs or 1))
    return min(total, max_steps) if max_steps > 0 else total


def _steps(value: float, total: int) -> float:
    """A length given as a fraction of the run (``< 1``) or as a number of steps (``>= 1``), in steps."""
    return float(value) * total if value < 1 else float(value)


class WarmupSchedule:
    """Per-step learning rate: linear warm-up, then a decay of kind ``kind``.

    With ``t`` the optimiser step, ``T`` all steps, ``W`` the warm-up steps and ``s = max(0, t - W)`` the steps
    after warm-up, the learning rate is ``lr * warm(t) * decay`` where ``warm(t)`` rises linearly from
    ``warmup_factor`` at ``t = 0`` to 1 at ``t = W``, and ``decay`` is:

    * ``constant``: 1
    * ``step``: ``gamma ** floor(s / period)``
    * ``multistep``: ``gamma ** (number of milestones <= t)`` (milestones as fractions of ``T``, or steps)
    * ``exponential``: ``gamma ** (s / period)``
    * ``inverse_time``: ``1 / (1 + decay_rate * s / period)`` (the course's ``lr0 / (1 + k t)``, ``t`` in periods)
    * ``inverse_sqrt``: ``1 / sqrt(1 + s / period)``
    * ``cosine``: ``min_ratio + (1 - min_ratio) * (1 + cos(pi * s / (T - W))) / 2``
    * ``one_cycle``: torch's ``OneCycleLR`` (Smith's 1cycle; linear rise over the warm-up from
      ``lr * warmup_factor`` to ``lr``, linear fall to ``lr * min_ratio``, momentum cycled inversely when the
      optimiser has one)

    Lengths (``warmup``, ``period``, ``milestones``) are fractions of all steps when ``< 1``, else steps.
    """

    KINDS = ("constant", "step", "multistep", "exponential", "inverse_time", "inverse_sqrt", "cosine", "one_cycle")

    def __init__(self, kind: str = "cosine", warmup: float = 0.05, warmup_factor: float = 0.001,
                 min_ratio: float = 0.05, milestones: tuple[float, ...] = (0.67, 0.89), gamma: float = 0.1,
                 period: float = 0.25, decay_rate: float = 1.0) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"schedule kind must be one of {self.KINDS}, got {kind!r}")
        if period <= 0 or warmup < 0 or not 0 < warmup_factor <= 1:
            raise ValueError(f"schedule: period must be > 0, warmup >= 0 and 0 < warmup_factor <= 1 (got "
                             f"period={period}, warmup={warmup}, warmup_factor={warmup_factor})")
        self.kind, self.warmup, self.warmup_factor = kind, warmup, warmup_factor
        self.min_ratio, self.milestones, self.gamma = min_ratio, tuple(milestones), gamma
        self.period, self.decay_rate = period, decay_rate

    def warmup_steps(self, total_steps: int) -> int:
        return int(_steps(self.warmup, max(1, int(total_steps))))

    def factor_fn(self, total_steps: int) -> Callable[[int], float]:
        """The factor ``warm(t) * decay`` of the learning rate at step ``t`` (all kinds but ``one_cycle``)."""
        total = max(1, int(total_steps))
        warm = self.warmup_steps(total)
        period = max(1e-9, _steps(self.period, total))
        milestones = [_steps(m, total) for m in self.milestones]

        def factor(step: int) -> float:
            base = self.warmup_factor + (1 - self.warmup_factor) * step / warm if step < warm else 1.0
            s = max(0, step - warm)
            if self.kind == "cosine":
                after = min(1.0, s / max(1, total - warm))
                decay = self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * after))
            elif self.kind == "step":
                decay = self.gamma ** math.floor(s / period)
            elif self.kind == "multistep":
                decay = self.gamma ** sum(step >= m for m in milestones)
            elif self.kind == "exponential":
                decay = self.gamma ** (s / period)
            elif self.kind == "inverse_time":
                decay = 1.0 / (1.0 + self.decay_rate * s / period)
            elif self.kind == "inverse_sqrt":
                decay = 1.0 / math.sqrt(1.0 + s / period)
            else:
                decay = 1.0
            return base * decay

        return factor

    def build(self, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
        """The per-step scheduler for ``optimizer`` (each group's ``lr`` is its peak)."""
        total = max(1, int(total_steps))
        if self.kind == "one_cycle" and total >= 3:
            rise = min(max(2, self.warmup_steps(total)), total - 1)  # both of torch's phases need >= 1 step
            has_momentum = any("momentum" in g or "betas" in g for g in optimizer.param_groups) and \
                all(g.get("momentum", 1.0) > 0 for g in optimizer.param_groups)
            return torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total,
                pct_start=rise / total, anneal_strategy="linear",
                div_factor=1.0 / self.warmup_factor, final_div_factor=self.warmup_factor / max(self.min_ratio, 1e-12),
                cycle_momentum=has_momentum)
        if self.kind == "one_cycle":  # a run of 1-2 steps: no cycle to make
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, self.factor_fn(total))

    def curve(self, total_steps: int, lr: float = 1.0) -> list[float]:
        """The learning rate at every step ``0 .. total_steps - 1`` for a peak ``lr`` (for plots and tests)."""
        param = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.SGD([param], lr=lr, momentum=0.9)
        scheduler = self.build(optimizer, total_steps)
        values = []
        for _ in range(max(1, int(total_steps))):
            values.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return values


def plot_lr_schedule(schedule: WarmupSchedule, total_steps: int, lr: float, path, title: str = "") -> list[float]:
    """Write the learning-rate curve of ``schedule`` over ``total_steps`` for a peak ``lr`` as a PNG at ``path``
    and its values as ``path`` with ``.csv``; returns the values."""
    from pathlib import Path

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = schedule.curve(total_steps, lr)
    path = Path(path)
    path.with_suffix(".csv").write_text("step,lr\n" + "".join(f"{i},{v:.8g}\n" for i, v in enumerate(values)))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(values)
    ax.set(xlabel="optimiser step", ylabel="learning rate", title=title or f"{schedule.kind}, {total_steps} steps")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return values
