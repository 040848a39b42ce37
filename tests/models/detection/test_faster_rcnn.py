"""Faster R-CNN behaviour: trains on empty images and degenerate boxes without NaN, and learns."""

from __future__ import annotations

from functools import partial

import torch

from detkit.models.backbones import Backbone
from detkit.models.detection.anchors import AnchorGenerator
from detkit.models.detection.faster_rcnn import FasterRCNN
from detkit.models.detection.roi_heads import RoIHeads, TwoMLPHead
from detkit.models.detection.rpn import RegionProposalNetwork
from detkit.models.detection.sampler import BalancedSampler


def small_detector(num_classes: int = 2) -> FasterRCNN:
    torch.manual_seed(0)
    backbone = Backbone(depth=18, levels=["c3", "c4", "c5"], neck="fpn", neck_channels=32)
    anchors = AnchorGenerator(sizes=[[16], [32], [64]], aspect_ratios=[[0.5, 1.0, 2.0]] * 3)
    return FasterRCNN(backbone, num_classes, partial(RegionProposalNetwork, anchor_generator=anchors,
                                                     pre_nms_top_n={"train": 300, "test": 300},
                                                     post_nms_top_n={"train": 200, "test": 100}),
                      partial(RoIHeads, box_head=partial(TwoMLPHead, hidden=64), sampler=BalancedSampler(64, 0.25)))


def test_empty_images_and_degenerate_boxes_train_without_nan():
    model = small_detector().train()
    images = torch.randint(0, 255, (3, 3, 128, 128), dtype=torch.uint8)
    targets = [
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},  # no objects at all
        {"boxes": torch.tensor([[10.0, 10.0, 11.0, 11.0], [50, 50, 50, 80]]), "labels": torch.tensor([0, 1])},
        {"boxes": torch.tensor([[20.0, 30.0, 90.0, 100.0]]), "labels": torch.tensor([1])},
    ]
    losses = model.loss(images, targets)
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    only_empty = model.loss(images[:1], targets[:1])
    assert only_empty["loss_rpn_box_reg"] == 0 and only_empty["loss_box_reg"] == 0
    assert torch.isfinite(sum(only_empty.values()))


def test_a_few_steps_reduce_the_loss_and_predict_in_input_pixels():
    model = small_detector()
    g = torch.Generator().manual_seed(0)
    images = torch.full((2, 3, 128, 128), 30, dtype=torch.uint8)
    images[0, :, 20:60, 30:90] = 220
    images[1, :, 70:120, 10:50] = 220
    targets = [{"boxes": torch.tensor([[30.0, 20.0, 90.0, 60.0]]), "labels": torch.tensor([0])},
               {"boxes": torch.tensor([[10.0, 70.0, 50.0, 120.0]]), "labels": torch.tensor([1])}]
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    first = None
    for _ in range(12):
        loss = sum(model.loss(images + torch.randint(0, 3, images.shape, generator=g, dtype=torch.uint8),
                              targets).values())
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.6 * first
    model.eval()
    with torch.no_grad():
        dets = model.predict(images)
    assert dets.boxes.shape[0] == 2 and (dets.boxes[dets.valid] <= 128).all() and (dets.boxes >= 0).all()
