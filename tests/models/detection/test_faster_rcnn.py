"""Faster R-CNN behaviour: trains on empty images and degenerate boxes without NaN, and learns."""

from __future__ import annotations

import math
from functools import partial

import pytest
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


def test_soft_background_weights_only_the_sampled_background_rois_classification_loss():
    """Soft Teacher's weights on a hand-built case: every RoI gets the same logits [0, 1, 2] (class 1, class 2 =
    background), so a foreground RoI's cross-entropy is lse - 1 and a background one's lse - 2. Image 0 has one box
    and one proposal on it (2 positives with the box itself) plus 9 far proposals (6 sampled negatives); image 1 has
    no box and 3 valid proposals of 10 (3 negatives, 5 invalid slots). The weights given to foreground RoIs (0 here)
    and to invalid slots (0.5) must not count."""
    from detkit.structures import Proposals, Targets

    torch.manual_seed(0)
    heads = RoIHeads(in_channels=8, strides=[8], num_classes=2, box_head=partial(TwoMLPHead, hidden=16),
                     sampler=BalancedSampler(8, 0.25))
    with torch.no_grad():
        heads.box_predictor.cls_score.weight.zero_()
        heads.box_predictor.cls_score.bias.copy_(torch.tensor([0.0, 1.0, 2.0]))
    features = [torch.randn(2, 8, 16, 16)]
    far = torch.tensor([[60.0 + 3 * k, 60.0, 100.0 + 3 * k, 100.0] for k in range(9)])
    boxes = torch.stack([torch.cat([torch.tensor([[10.0, 10.0, 40.0, 40.0]]), far]), torch.cat([far[:1], far])])
    valid = torch.tensor([[True] * 10, [True] * 3 + [False] * 7])
    proposals = Proposals(boxes, valid, torch.zeros(2, dtype=torch.int64))
    targets = Targets.from_list([{"boxes": torch.tensor([[10.0, 10.0, 40.0, 40.0]]), "labels": torch.tensor([1])},
                                 {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}])
    seen = []

    def weights(sampled: torch.Tensor) -> torch.Tensor:  # 0 on the box (foreground), 0.25 / 0.5 elsewhere
        seen.append(sampled)
        per_image = torch.tensor([[0.25], [0.5]]).expand(2, sampled.shape[1])
        return torch.where(sampled[..., 0] < 50, torch.zeros_like(per_image), per_image)

    lse = math.log(1 + math.e + math.e ** 2)
    fg, bg = lse - 1, lse - 2
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    plain = heads.loss(features, proposals, targets, g())["loss_classifier"]
    soft = heads.loss(features, proposals, targets, g(), background_weights=weights)["loss_classifier"]
    ones = heads.loss(features, proposals, targets, g(), background_weights=lambda b: torch.ones(b.shape[:2]))
    assert seen[0].shape == (2, 8, 4)
    assert float(plain.detach()) == pytest.approx((2 * fg + 9 * bg) / 11, rel=1e-5)
    assert float(soft.detach()) == pytest.approx((2 * fg + (6 * 0.25 + 3 * 0.5) * bg) / 5, rel=1e-5)
    assert float(ones["loss_classifier"].detach()) == pytest.approx(float(plain.detach()), rel=1e-6)


def test_the_background_probability_is_the_softmaxs_background_column():
    heads = RoIHeads(in_channels=8, strides=[8], num_classes=2, box_head=partial(TwoMLPHead, hidden=16))
    with torch.no_grad():  # every box gets logits [0, 1, 2]: class 0, class 1, background
        heads.box_predictor.cls_score.weight.zero_()
        heads.box_predictor.cls_score.bias.copy_(torch.tensor([0.0, 1.0, 2.0]))
    boxes = torch.tensor([[[0.0, 0.0, 20.0, 20.0], [30.0, 10.0, 90.0, 70.0], [5.0, 5.0, 6.0, 6.0]]]).expand(2, 3, 4)
    p = heads.background_probability([torch.randn(2, 8, 16, 16)], boxes)
    assert p.shape == (2, 3) and p.dtype == torch.float32
    assert torch.allclose(p, torch.full((2, 3), math.e ** 2 / (1 + math.e + math.e ** 2)))
