"""Region proposal network: anchors scored for objectness and refined into proposals (Ren et al. 2015)."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from detkit.models.detection.anchors import AnchorGenerator, anchors_per_location
from detkit.models.detection.box_coder import BoxCoder
from detkit.models.detection.boxes import batched_box_iou, clip_boxes, pad_targets, small_boxes
from detkit.models.detection.losses import box_regression_loss
from detkit.models.detection.matcher import Matcher
from detkit.models.detection.postprocess import batched_multiclass_nms
from detkit.models.detection.sampler import BalancedSampler


class RPNHead(nn.Module):
    """3x3 conv + ReLU, then 1x1 objectness (``A`` per location) and 1x1 box deltas (``4A`` per location); shared
    across feature levels."""

    def __init__(self, in_channels: int, num_anchors: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, 1)
        for layer in (self.conv, self.cls_logits, self.bbox_pred):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per level: logits ``[B, H*W*A]`` and deltas ``[B, H*W*A, 4]`` in the anchor generator's order."""
        logits, deltas = [], []
        for f in features:
            t = F.relu(self.conv(f))
            b, _, h, w = t.shape
            logits.append(self.cls_logits(t).permute(0, 2, 3, 1).reshape(b, -1))
            deltas.append(self.bbox_pred(t).view(b, -1, 4, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, 4))
        return logits, deltas


class RegionProposalNetwork(nn.Module):
    """RPN with batched target assignment, sampling and proposal filtering.

    Args:
        in_channels: backbone feature channels.
        anchor_generator: anchor sizes/ratios per level (its level count must match the backbone's).
        pre_nms_top_n: proposals kept per level and image before NMS, ``{"train": n, "test": n}``.
        post_nms_top_n: proposals kept per image after NMS, ``{"train": n, "test": n}``.
        nms_thresh: NMS IoU among proposals.
        fg_iou_thresh / bg_iou_thresh: matcher thresholds (0.7 / 0.3).
        batch_size_per_image / positive_fraction: anchor sampling (256 / 0.5).
        min_size: proposals smaller than this (pixels) are dropped.
        box_loss: ``"smooth_l1"`` or ``"l1"``.
        nms_strategy: ``"auto"``, ``"per_image"`` or ``"batched"`` (see :mod:`detkit.models.detection.postprocess`).
    """

    def __init__(
        self,
        in_channels: int,
        anchor_generator: AnchorGenerator,
        pre_nms_top_n: Mapping[str, int] = {"train": 2000, "test": 1000},  # noqa: B006 (read-only)
        post_nms_top_n: Mapping[str, int] = {"train": 2000, "test": 1000},  # noqa: B006
        nms_thresh: float = 0.7,
        fg_iou_thresh: float = 0.7,
        bg_iou_thresh: float = 0.3,
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
        min_size: float = 1e-3,
        box_loss: str = "smooth_l1",
        nms_strategy: str = "auto",
    ) -> None:
        super().__init__()
        self.anchor_generator = anchor_generator
        num_anchors = anchors_per_location(anchor_generator.sizes, anchor_generator.aspect_ratios)
        self.head = RPNHead(in_channels, num_anchors)
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=True)
        self.sampler = BalancedSampler(batch_size_per_image, positive_fraction)
        self.pre_nms_top_n, self.post_nms_top_n = dict(pre_nms_top_n), dict(post_nms_top_n)
        self.nms_thresh, self.min_size = nms_thresh, min_size
        self.box_loss, self.nms_strategy = box_loss, nms_strategy

    def forward(self, features: Mapping[str, torch.Tensor], image_size: tuple[int, int],
                targets: list[dict] | None = None, generator: torch.Generator | None = None
                ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """Return per-image proposals ``[P_i, 4]`` (xyxy, detached) and, given targets, the RPN losses
        ``loss_objectness`` and ``loss_rpn_box_reg`` (anchor sampling draws from ``generator``)."""
        maps = list(features.values())
        anchors = self.anchor_generator(maps, image_size)
        logits, deltas = self.head(maps)
        proposals = self.propose(anchors, logits, deltas, image_size)
        losses = {}
        if targets is not None:
            losses = self.loss(torch.cat(anchors), torch.cat(logits, 1), torch.cat(deltas, 1), targets, generator)
        return proposals, losses

    def propose(self, anchors: list[torch.Tensor], logits: list[torch.Tensor], deltas: list[torch.Tensor],
                image_size: tuple[int, int]) -> list[torch.Tensor]:
        """Top-k per level, decode, clip, drop tiny boxes, NMS per level, top-k per image (batched)."""
        mode = "train" if self.training else "test"
        boxes, scores, levels = [], [], []
        for lvl, (a, lg, d) in enumerate(zip(anchors, logits, deltas)):
            lg = lg.detach()
            k = min(self.pre_nms_top_n[mode], lg.shape[1])
            top, idx = lg.topk(k, dim=1)  # [B, k]
            boxes.append(self.box_coder.decode(d.detach().gather(1, idx[..., None].expand(-1, -1, 4)), a[idx]))
            scores.append(top)
            levels.append(torch.full_like(idx, lvl))
        boxes = clip_boxes(torch.cat(boxes, 1), *image_size)
        scores, levels = torch.cat(scores, 1).sigmoid(), torch.cat(levels, 1)
        valid = ~small_boxes(boxes, self.min_size)
        kept = batched_multiclass_nms(boxes, scores, levels, valid, self.nms_thresh, self.post_nms_top_n[mode],
                                      self.nms_strategy, num_classes=len(anchors))
        return [b[v] for b, v in zip(kept.boxes, kept.valid)]

    def loss(self, anchors: torch.Tensor, logits: torch.Tensor, deltas: torch.Tensor,
             targets: list[dict], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Losses from anchors ``[A, 4]``, logits ``[B, A]`` and deltas ``[B, A, 4]``, batched over images."""
        gt_boxes, _, gt_valid = pad_targets(targets, anchors.device)
        matches = self.matcher(batched_box_iou(gt_boxes, anchors[None]), gt_valid)  # [B, A]
        pos, neg = self.sampler(matches >= 0, matches == Matcher.BACKGROUND, generator)
        sampled = pos | neg
        num = sampled.sum().clamp(min=1)
        img, idx = pos.nonzero(as_tuple=True)
        target_deltas = self.box_coder.encode(gt_boxes[img, matches[img, idx]], anchors[idx])
        box = box_regression_loss(deltas[img, idx].float(), target_deltas, self.box_loss) / num
        obj = F.binary_cross_entropy_with_logits(logits[sampled].float(), pos[sampled].float())
        return {"loss_objectness": obj, "loss_rpn_box_reg": box}
