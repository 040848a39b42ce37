"""Distributed evaluation: 2 CPU processes (gloo) gather predictions and give the single-process COCO result."""

from __future__ import annotations

import lightning as L
import pytest

from detkit.data.datamodule import DetectionDataModule
from detkit.data.synthetic import make_synthetic_coco
from detkit.data.transforms import DetectionTransform
from detkit.lit.detection_module import DetectionModule

BACKBONE = {"_target_": "detkit.models.backbones.Backbone", "depth": 18, "levels": ["c3", "c4", "c5"],
            "neck_channels": 32}
DETECTOR = {"_target_": "detkit.models.detection.faster_rcnn.FasterRCNN",
            "rpn": {"_target_": "detkit.models.detection.rpn.RegionProposalNetwork", "_partial_": True,
                    "anchor_generator": {"_target_": "detkit.models.detection.anchors.AnchorGenerator",
                                         "sizes": [[16], [32], [64]], "aspect_ratios": [[0.5, 1.0, 2.0]] * 3}},
            "roi_heads": {"_target_": "detkit.models.detection.roi_heads.RoIHeads", "_partial_": True,
                          "box_head": {"_target_": "detkit.models.detection.roi_heads.TwoMLPHead", "_partial_": True,
                                       "hidden": 64},
                          "inference": {"_target_": "detkit.models.detection.postprocess.PostProcess",
                                        "score_thresh": 0.0}},
            "backbone": BACKBONE}


def trained_module(tmp_path) -> tuple[DetectionModule, DetectionDataModule]:
    """A small Faster R-CNN trained for a few steps on synthetic images, so evaluation has real matches."""
    ann, root = make_synthetic_coco(tmp_path / "d", num_images=7, seed=2)  # odd: the sampler pads one rank
    L.seed_everything(0)
    module = DetectionModule(DETECTOR, [{"id": i, "name": f"c{i}"} for i in range(3)],
                             {"_target_": "torch.optim.SGD", "lr": 0.02, "momentum": 0.9},
                             {"_target_": "detkit.lit.optim.WarmupSchedule", "warmup": 0.1})
    dm = DetectionDataModule(str(ann), str(root), str(ann), str(root), image_size=128, batch_size=4, num_workers=0,
                             train_transform=DetectionTransform(128, train=True, scale_range=(1.0, 1.0)),
                             eval_transform=DetectionTransform(128))
    dm.setup("fit")
    L.Trainer(accelerator="cpu", max_steps=30, logger=False, enable_progress_bar=False, enable_checkpointing=False,
              enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0).fit(module, datamodule=dm)
    return module, dm


def evaluate(module: DetectionModule, dm: DetectionDataModule, devices: int) -> dict:
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                        logger=False, enable_progress_bar=False, enable_model_summary=False)
    return trainer.validate(module, datamodule=dm, verbose=False)[0]


@pytest.mark.slow
def test_two_process_evaluation_equals_single_process(tmp_path):
    module, dm = trained_module(tmp_path)
    single = evaluate(module, dm, devices=1)
    ddp = evaluate(module, dm, devices=2)
    assert single["val/AR100"] > 0  # the model does match objects: the comparison is not vacuous
    for key, value in single.items():
        assert ddp[key] == pytest.approx(value, abs=1e-9), key
