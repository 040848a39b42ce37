"""Stop a diverging run at once, with a message that says what happened and what to try, without stalling a GPU.

Every training step hands its loss terms (and the detector's health figures, e.g. non-finite proposals) to a
:class:`DivergenceMonitor`. On a CPU they are checked on the spot. On a GPU the values are copied to pinned host
memory with ``non_blocking=True`` behind a CUDA event, and a step reads the values of earlier steps whose events
have completed (``Event.query()`` never waits): no host synchronisation per step, and a divergence is reported
within the few steps the host runs ahead of the device. Before a checkpoint is written the pending values are
checked synchronously, so a checkpoint never holds weights updated by a non-finite loss.
"""

from __future__ import annotations

from collections import deque
from typing import Sequence

import torch


class TrainingDivergedError(RuntimeError):
    """A loss term or a health figure became non-finite (or a health count non-zero) during training."""


class DivergenceMonitor:
    """Watches the named scalars of each training step.

    Args:
        hint: appended to the error message (what to try; the Lightning module fills in its settings).
        every: check every this many steps (1: all).
    """

    def __init__(self, hint: str = "", every: int = 1) -> None:
        self.hint, self.every = hint, max(1, int(every))
        self._pending: deque = deque()

    def record(self, step: int, losses: dict[str, torch.Tensor], health: dict[str, torch.Tensor]) -> None:
        """Queue step ``step``'s ``losses`` (must be finite) and ``health`` counts (must be 0) and check every
        queued step whose values have reached the host."""
        if step % self.every:
            return
        names = [*losses, *health]
        values = torch.stack([v.detach().float().reshape(()) for v in [*losses.values(), *health.values()]])
        if values.device.type != "cuda":
            self._check(step, names, values, len(losses))
            return
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        host.copy_(values, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((step, names, host, event, len(losses)))
        while self._pending and self._pending[0][3].query():
            self._check(*self._pop())

    def flush(self) -> None:
        """Check every queued step now (waits for the device); call before saving a checkpoint."""
        while self._pending:
            item = self._pending[0]
            item[3].synchronize()
            self._check(*self._pop())

    def _pop(self) -> tuple:
        step, names, host, _, n_losses = self._pending.popleft()
        return step, names, host, n_losses

    def _check(self, step: int, names: Sequence[str], values: torch.Tensor, n_losses: int) -> None:
        vals = values.tolist()
        bad_loss = [n for n, v in zip(names[:n_losses], vals[:n_losses]) if not torch.isfinite(torch.tensor(v))]
        bad_health = [n for n, v in zip(names[n_losses:], vals[n_losses:]) if v != 0]
        if not bad_loss and not bad_health:
            return
        terms = ", ".join(f"{n}={v:.6g}" for n, v in zip(names, vals))
        what = " and ".join(filter(None, [f"non-finite loss ({', '.join(bad_loss)})" if bad_loss else "",
                                          f"{', '.join(bad_health)} > 0" if bad_health else ""]))
        self._pending.clear()
        raise TrainingDivergedError(f"training diverged at step {step}: {what}. Loss terms at that step: {terms}. "
                                    f"{self.hint}".strip())
