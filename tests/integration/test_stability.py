"""Both detectors train stably at the smallest batches, on real photos, with every default (issue 21: detkit's
Faster R-CNN once blew up at batch 2 where torchvision's did not)."""

from __future__ import annotations

import math
import lightning as L
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from detkit.cli.train import build_datamodule
from detkit.paths import config_dir
from tests.helpers import RACCOON



class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


@pytest.mark.parametrize("model", ["faster_rcnn", "yolo"])
@pytest.mark.parametrize("batch_size", [1, 2])
def test_training_at_batch_1_and_2_stays_finite(model, batch_size):
    ann = RACCOON / "annotations.json"
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[
            "data=coco", f"data.train_ann={ann}", f"data.train_images={RACCOON / 'images'}", f"model={model}",
            f"data.batch_size={batch_size}", "data.num_workers=0", "paths.output_dir=/tmp/x"])
    dm = build_datamodule(cfg)  # every default, as detkit-train would run it (the size chosen from the boxes)
    module = instantiate(cfg.model, categories=dm.categories.to_list(), image_size=cfg.data.image_size,
                         _recursive_=False)
    recorder = LossRecorder()
    steps = 24
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[recorder],
                        gradient_clip_val=cfg.trainer.gradient_clip_val)
    trainer.fit(module, datamodule=dm)  # a non-finite loss would stop it with TrainingDivergedError
    assert len(recorder.losses) == steps
    assert all(math.isfinite(v) and v < 50 for v in recorder.losses), recorder.losses
