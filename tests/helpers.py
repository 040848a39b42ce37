"""Test-only Lightning callbacks (importable by Hydra from a subprocess run in the repository root)."""

from __future__ import annotations

import os
import signal

import lightning as L


class KillAtStep(L.Callback):
    """SIGKILL the training process when ``global_step`` reaches ``step``: no clean-up, no final checkpoint, as a
    power cut or an out-of-memory kill would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class RecordBatches(L.Callback):
    """Append ``step image_ids pixel_sum box_sum`` per training batch to ``path`` (debugging determinism)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        images, targets = batch
        ids = targets.image_ids.tolist()
        boxes = float((targets.boxes * targets.valid[..., None]).sum())
        with open(self.path, "a") as f:
            f.write(f"{trainer.global_step} {ids} {int(images.long().sum())} {boxes:.3f}\n")


class PoisonAtStep(L.Callback):
    """Set the RPN's box-regression weights to +inf when ``global_step`` reaches ``step``: a stand-in for an
    optimiser step that blew the weights up (the next forward decodes non-finite proposals and losses)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if trainer.global_step == self.step:
            head = pl_module.detector.rpn.head.bbox_pred
            head.weight.data.fill_(float("inf"))
