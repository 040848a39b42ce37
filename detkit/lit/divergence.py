"""Stop a diverging run at once, with a message that says what happened and what to try, without stalling a GPU.

Every training step hands its loss terms (and the detector's health figures, e.g. non-finite proposals) to a
:class:`DivergenceMonitor`. On a CPU they are checked on the spot. On a GPU the values are copied to pinned host
memory with ``non_blocking=True`` behind a CUDA event, and a step reads the values of earlier steps whose events
have completed (``Event.query()`` never waits): no host synchronisation per step, and a divergence is reported
within the few steps the host runs ahead of the device. Before a checkpoint is written the pending values are
checked synchronously, so a checkpoint never holds weights updated by a non-finite loss.

With ``every > 1`` the host reads values only every ``every`` steps, but no step goes unwatched: every step folds
its values into a device-side record of the first bad step (its number and values, kept with ``torch.where``, no
host read), and each check, and every flush before a checkpoint, reads that record.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Sequence

import torch

from detkit.errors import UserError


class TrainingDivergedError(UserError, RuntimeError):
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
        self._first_bad: torch.Tensor | None = None  # [1 + V]: the first bad step's number (-1: none) and values
        self._names: list[str] = []
        self._n_losses = 0
        self._unsent = False  # steps folded into the record since the host last read it

    def record(self, step: int, losses: dict[str, torch.Tensor], health: dict[str, torch.Tensor]) -> None:
        """Fold step ``step``'s ``losses`` (must be finite) and ``health`` counts (must be 0) into the record of the
        first bad step; on every ``every``-th step, send the record to the host and check every record that has
        arrived."""
        names = [*losses, *health]
        values = torch.stack([v.detach().float().reshape(()) for v in [*losses.values(), *health.values()]])
        bad = (~torch.isfinite(values[: len(losses)])).any() | (values[len(losses):] != 0).any()
        entry = torch.cat([torch.full((1,), float(step), device=values.device), values])
        if self._first_bad is None or names != self._names:
            self._flush_record()  # the terms changed: read what was recorded under the old names first
            self._first_bad = torch.full_like(entry, -1.0)
            self._names, self._n_losses = names, len(losses)
        # Kept on the device: the first step whose values are bad, with those values (no host read).
        self._first_bad = torch.where(bad & (self._first_bad[0] < 0), entry, self._first_bad)
        self._unsent = True
        if step % self.every == 0:
            self._send()

    def flush(self) -> None:
        """Check every step recorded so far now (waits for the device); call before saving a checkpoint."""
        self._flush_record()

    def _flush_record(self) -> None:
        if self._unsent:
            self._send()
        while self._pending:
            item = self._pending[0]
            if item[1] is not None:
                item[1].synchronize()
            self._check(*self._pop())

    def _send(self) -> None:
        record, self._unsent = self._first_bad, False
        if record.device.type != "cuda":
            self._check(record, self._names, self._n_losses)
            return
        host = torch.empty(record.shape, dtype=record.dtype, pin_memory=True)
        host.copy_(record, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((host, event, self._names, self._n_losses))
        while self._pending and self._pending[0][1].query():
            self._check(*self._pop())

    def _pop(self) -> tuple:
        host, _, names, n_losses = self._pending.popleft()
        return host, names, n_losses

    def _check(self, record: torch.Tensor, names: Sequence[str], n_losses: int) -> None:
        step, *vals = record.tolist()
        if step < 0:
            return
        bad_loss = [n for n, v in zip(names[:n_losses], vals[:n_losses]) if not math.isfinite(v)]
        bad_health = [n for n, v in zip(names[n_losses:], vals[n_losses:]) if v != 0]
        terms = ", ".join(f"{n}={v:.6g}" for n, v in zip(names, vals))
        what = " and ".join(filter(None, [f"non-finite loss ({', '.join(bad_loss)})" if bad_loss else "",
                                          f"{', '.join(bad_health)} > 0" if bad_health else ""]))
        self._pending.clear()
        self._unsent = False
        raise TrainingDivergedError(f"training diverged at step {int(step)}: {what}. Loss terms at that step: "
                                    f"{terms}. {self.hint}".strip())
