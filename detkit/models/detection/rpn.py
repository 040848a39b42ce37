"""Region proposal network: anchors scored for objectness and refined into proposals (Ren et al. 2015).

Fixed-shape throughout: proposals are ``[B, P, 4]`` with a ``[B, P]`` valid mask (``P = post_nms_top_n``), the
anchor sample is ``B x batch_size_per_image`` slots, and the losses are masked sums, so a training step has no
host synchronisation and no data-dependent shape.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from detkit.models.detection.anchors import AnchorGenerator, anchors_per_location
from detkit.models.detection.box_coder import BoxCoder
from detkit.models.detection.boxes import batched_box_iou, clip_boxes, finite_boxes, small_boxes
from detkit.models.detection.losses import box_regression_loss, masked_mean
from detkit.models.detection.matcher import Matcher
from detkit.models.detection.postprocess import batched_multiclass_nms, cluster_nms, resolve_strategy
from detkit.models.detection.sampler import BalancedSampler
from detkit.models.norm import check_norm, norm2d
from detkit.structures import Proposals, Targets


class RPNHead(nn.Module):
    """3x3 conv (+ ``norm``) + ReLU, then 1x1 objectness (``A`` per location) and 1x1 box deltas (``4A`` per
    location); shared across feature levels. ``norm``: ``"none"`` (the paper's), ``"bn"`` or ``"gn"``
    (:mod:`detkit.models.norm`; a BatchNorm's statistics are then shared by all levels, as torchvision's v2 head)."""

    def __init__(self, in_channels: int, num_anchors: int, norm: str | None = "none") -> None:
        super().__init__()
        norm = check_norm(norm or "none", "RPN head")
        self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1, bias=norm == "none")
        self.norm = norm2d(norm, in_channels)
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, 1)
        for layer in (self.conv, self.cls_logits, self.bbox_pred):
            nn.init.normal_(layer.weight, std=0.01)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)

    def forward(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per level: logits ``[B, H*W*A]`` and deltas ``[B, H*W*A, 4]`` in the anchor generator's order."""
        logits, deltas = [], []
        for f in features:
            t = F.relu(self.norm(self.conv(f)))
            b, _, h, w = t.shape
            logits.append(self.cls_logits(t).permute(0, 2, 3, 1).reshape(b, -1))
            deltas.append(self.bbox_pred(t).view(b, -1, 4, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, 4))
        return logits, deltas


class RegionProposalNetwork(nn.Module):
    """RPN with batched target assignment, fixed-size anchor sampling and fixed-size proposals.

    Args:
        in_channels: backbone feature channels.
        anchor_generator: anchor sizes/ratios per level (its level count must match the backbone's).
        sampler: anchor sampling (256 per image, half positives, as Faster R-CNN).
        pre_nms_top_n: proposals kept per level and image before NMS, ``{"train": n, "test": n}``.
        post_nms_top_n: proposals kept per image after NMS, ``{"train": n, "test": n}`` (= ``P``).
        nms_thresh: NMS IoU among proposals (within a level, as torchvision).
        nms: ``"auto"``, ``"cluster"`` or ``"torchvision"`` (see :mod:`detkit.models.detection.postprocess`).
        nms_iterations: cluster NMS (the GPU default) runs this many iterations ``t``, with no host
            synchronisation. Bound (:func:`~detkit.models.detection.postprocess.cluster_nms`): the candidates of
            an (image, level) whose longest suppression chain has at most ``t`` steps are kept exactly as greedy NMS
            (the CPU path, torchvision) keeps them; deeper ones, with an even ``t``, only ever add proposals: the
            kept set before the top ``post_nms_top_n`` contains greedy NMS's. Measured: 1-3 iterations reach
            greedy NMS's result on RPN outputs; a chain of ``n`` boxes, each overlapping the next by more than
            ``nms_thresh``, needs ``n - 1`` (24 such anchors: 22 proposals at ``t = 4``, 12 from greedy NMS).
            Proposals only need to be good candidates, and exactness without a host synchronisation costs
            ``pre_nms_top_n - 1`` iterations. ``None``: exact (iterates to greedy NMS's result, one host check
            per 4 iterations; ONNX's NonMaxSuppression in an export).
        fg_iou_thresh / bg_iou_thresh: matcher thresholds (0.7 / 0.3).
        min_size: proposals smaller than this (pixels) are dropped.
        box_loss: ``"smooth_l1"`` or ``"l1"``.
        head_norm: normalisation in the head's 3x3 conv (:class:`RPNHead`): ``"none"`` (also ``None``), ``"bn"`` or
            ``"gn"``.
    """

    def __init__(
        self,
        in_channels: int,
        anchor_generator: AnchorGenerator,
        sampler: BalancedSampler | None = None,
        pre_nms_top_n: Mapping[str, int] = {"train": 1000, "test": 500},  # noqa: B006 (read-only)
        post_nms_top_n: Mapping[str, int] = {"train": 1000, "test": 500},  # noqa: B006
        nms_thresh: float = 0.7,
        nms: str = "auto",
        nms_iterations: int | None = 4,
        fg_iou_thresh: float = 0.7,
        bg_iou_thresh: float = 0.3,
        min_size: float = 1e-3,
        box_loss: str = "smooth_l1",
        head_norm: str | None = "none",
    ) -> None:
        super().__init__()
        self.anchor_generator = anchor_generator
        num_anchors = anchors_per_location(anchor_generator.sizes, anchor_generator.aspect_ratios)
        self.head = RPNHead(in_channels, num_anchors, norm=head_norm)
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=True)
        self.sampler = sampler or BalancedSampler(256, 0.5)
        self.pre_nms_top_n, self.post_nms_top_n = dict(pre_nms_top_n), dict(post_nms_top_n)
        self.nms_thresh, self.nms, self.nms_iterations = nms_thresh, nms, nms_iterations
        self.min_size, self.box_loss = min_size, box_loss

    def forward(self, features: Mapping[str, torch.Tensor], image_size: tuple[int, int],
                targets: Targets | None = None, generator: torch.Generator | None = None
                ) -> tuple[Proposals, dict[str, torch.Tensor]]:
        """Proposals (detached) and, given targets, the losses ``loss_objectness`` and ``loss_rpn_box_reg``
        (anchor sampling draws from ``generator``)."""
        maps = list(features.values())
        anchors = self.anchor_generator(maps, image_size)
        logits, deltas = self.head(maps)
        proposals = self.propose(anchors, logits, deltas, image_size)
        losses = {}
        if targets is not None:
            losses = self.loss(self.anchor_generator.concatenated(maps, image_size), torch.cat(logits, 1),
                               torch.cat(deltas, 1), targets, generator)
        return proposals, losses

    @torch.no_grad()
    def propose(self, anchors: list[torch.Tensor], logits: list[torch.Tensor], deltas: list[torch.Tensor],
                image_size: tuple[int, int]) -> Proposals:
        """Top-k per level, decode (float32), clip, drop tiny or non-finite boxes, NMS per image and level, top-k
        per image. Returns ``P = post_nms_top_n`` proposals per image (invalid where fewer survive)."""
        mode = "train" if self.training else "test"
        k = min(self.pre_nms_top_n[mode], max(lg.shape[1] for lg in logits))
        boxes, scores, valid, nonfinite = [], [], [], []
        for a, lg, d in zip(anchors, logits, deltas):
            kl = min(k, lg.shape[1])
            top, idx = lg.float().topk(kl, dim=1)  # [B, kl], sorted
            box = clip_boxes(self.box_coder.decode(d.gather(1, idx[..., None].expand(-1, -1, 4)), a[idx]),
                             *image_size)
            finite = torch.isfinite(top) & finite_boxes(box)
            nonfinite.append((~finite).sum())
            ok = finite & ~small_boxes(box, self.min_size)
            pad = k - kl  # levels with fewer anchors than k are padded with invalid slots: one [B, L, k] tensor
            boxes.append(F.pad(box, (0, 0, 0, pad)))
            scores.append(F.pad(top, (0, pad), value=float("-inf")))
            valid.append(F.pad(ok, (0, pad), value=False))
        boxes, scores, valid = torch.stack(boxes, 1), torch.stack(scores, 1), torch.stack(valid, 1)  # [B, L, k]
        b, n_levels = boxes.shape[:2]
        post = self.post_nms_top_n[mode]
        if resolve_strategy(self.nms, boxes.device) == "cluster":
            # every (image, level) pair is one NMS problem; candidates are already sorted by score
            keep = cluster_nms(boxes.flatten(0, 1), valid.flatten(0, 1), None, self.nms_thresh,
                               exact=self.nms_iterations is None, iterations=self.nms_iterations or 4
                               ).view(b, n_levels, k)
            key = scores.masked_fill(~keep, float("-inf")).flatten(1)
            top = key.topk(min(post, key.shape[1]), dim=1)
            out_boxes = boxes.flatten(1, 2).gather(1, top.indices[..., None].expand(-1, -1, 4))
            out_valid = top.values > float("-inf")
        else:
            level = torch.arange(n_levels, device=boxes.device)[None, :, None].expand(b, -1, k)
            dets = batched_multiclass_nms(boxes.flatten(1, 2), scores.flatten(1), level.flatten(1),
                                          valid.flatten(1), self.nms_thresh, post, "torchvision")
            out_boxes, out_valid = dets.boxes, dets.valid
        if out_boxes.shape[1] < post:  # fewer candidates than P in all: pad to the fixed size
            out_boxes = F.pad(out_boxes, (0, 0, 0, post - out_boxes.shape[1]))
            out_valid = F.pad(out_valid, (0, post - out_valid.shape[1]), value=False)
        return Proposals(out_boxes, out_valid, torch.stack(nonfinite).sum())

    def loss(self, anchors: torch.Tensor, logits: torch.Tensor, deltas: torch.Tensor,
             targets: Targets, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Losses from anchors ``[A, 4]``, logits ``[B, A]`` and deltas ``[B, A, 4]``: binary cross-entropy over the
        sampled anchors, and the box loss over the sampled positives divided by the number sampled (as
        torchvision and detectron2), both masked sums over ``B x batch_size_per_image`` slots."""
        matches = self.matcher(batched_box_iou(targets.boxes, anchors[None]), targets.valid)  # [B, A]
        sample = self.sampler(matches >= 0, matches == Matcher.BACKGROUND, generator)
        count = sample.valid.sum()
        slot_logits = logits.gather(1, sample.index).float()
        obj = F.binary_cross_entropy_with_logits(slot_logits, sample.positive.float(), reduction="none")
        matched_gt = matches.gather(1, sample.index).clamp(min=0)  # [B, S]
        gt = targets.boxes.gather(1, matched_gt[..., None].expand(-1, -1, 4))
        target_deltas = self.box_coder.encode(gt, anchors[sample.index])
        pred = deltas.gather(1, sample.index[..., None].expand(-1, -1, 4))
        box = box_regression_loss(pred, target_deltas, self.box_loss)
        return {"loss_objectness": masked_mean(obj, sample.valid, count),
                "loss_rpn_box_reg": masked_mean(box, sample.positive, count)}
