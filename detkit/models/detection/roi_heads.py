"""RoI heads: pool features for proposals, classify them and refine their boxes (Fast/Faster R-CNN)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align, roi_pool

from detkit.models.detection.roi_align import roi_align_gather

from detkit.models.detection.box_coder import BoxCoder
from detkit.models.detection.boxes import batched_box_iou, box_area, clip_boxes, pad_targets, small_boxes
from detkit.models.detection.losses import box_regression_loss
from detkit.models.detection.matcher import Matcher
from detkit.models.detection.postprocess import Detections, batched_multiclass_nms, topk_candidates
from detkit.models.detection.sampler import BalancedSampler


def pad_boxes(boxes: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[P_i, 4]`` per image -> ``boxes [B, P, 4]`` and ``valid [B, P]``."""
    p = max([1] + [len(b) for b in boxes])
    out = boxes[0].new_zeros(len(boxes), p, 4)
    valid = torch.zeros(len(boxes), p, dtype=torch.bool, device=out.device)
    for i, b in enumerate(boxes):  # a copy per image: proposal counts differ per image
        out[i, : len(b)] = b
        valid[i, : len(b)] = True
    return out, valid


class RoIPooler(nn.Module):
    """RoIAlign (default) or RoIPool over one or several feature levels.

    With several levels each RoI is pooled from level ``k = floor(4 + log2(sqrt(area) / 224))`` (FPN paper,
    eq. 1), clamped to the available levels.

    Args:
        strides: stride of each pooled level, finest first.
        output_size: pooled side length.
        sampling_ratio: RoIAlign samples per bin (0 = adaptive).
        kind: ``"align"`` or ``"pool"``.
        aligned: RoIAlign with the half-pixel correction (detectron2's ROIAlignV2); torchvision uses False.
        impl: RoIAlign kernel: ``"torchvision"`` (``torchvision.ops.roi_align``, one call per level),
            ``"gather"`` (:func:`detkit.models.detection.roi_align.roi_align_gather`: the same values, one call for
            all levels, multi-threaded forward and backward on CPU), or ``"auto"``: gather on CPU, torchvision on
            other devices (its CUDA kernel is already parallel). Gather needs ``sampling_ratio > 0``.
    """

    def __init__(self, strides: Sequence[int], output_size: int = 7, sampling_ratio: int = 2, kind: str = "align",
                 aligned: bool = True, canonical_scale: float = 224.0, canonical_level: int = 4,
                 impl: str = "auto") -> None:
        super().__init__()
        if kind not in ("align", "pool"):
            raise ValueError(f"RoI pooler kind must be 'align' or 'pool', got {kind!r}")
        if impl not in ("auto", "torchvision", "gather"):
            raise ValueError(f"RoI pooler impl must be 'auto', 'torchvision' or 'gather', got {impl!r}")
        if impl == "gather" and (kind != "align" or sampling_ratio <= 0):
            raise ValueError("RoI pooler impl='gather' is RoIAlign with a fixed sampling_ratio > 0")
        self.strides = list(strides)
        self.output_size, self.sampling_ratio, self.kind, self.aligned = output_size, sampling_ratio, kind, aligned
        self.impl = impl
        self.canonical_scale, self.canonical_level = canonical_scale, canonical_level
        self.levels = [int(round(math.log2(s))) for s in self.strides]

    def assign_levels(self, boxes: torch.Tensor) -> torch.Tensor:
        """``[K, 4]`` -> index into the pooled levels, ``[K]``."""
        size = box_area(boxes).sqrt()
        k = torch.floor(self.canonical_level + torch.log2(size / self.canonical_scale + 1e-8))
        return (k.clamp(min=self.levels[0], max=self.levels[-1]) - self.levels[0]).to(torch.int64)

    def _pool_one(self, feature: torch.Tensor, rois: torch.Tensor, stride: int) -> torch.Tensor:
        if self.kind == "align":
            return roi_align(feature, rois, self.output_size, spatial_scale=1.0 / stride,
                             sampling_ratio=self.sampling_ratio, aligned=self.aligned)
        return roi_pool(feature, rois, self.output_size, spatial_scale=1.0 / stride)

    def use_gather(self, device: torch.device) -> bool:
        if self.impl == "auto":
            return self.kind == "align" and self.sampling_ratio > 0 and device.type == "cpu"
        return self.impl == "gather"

    def forward(self, features: list[torch.Tensor], rois: torch.Tensor) -> torch.Tensor:
        """``rois [K, 5]`` (batch index, xyxy) -> ``[K, C, S, S]``."""
        if self.use_gather(features[0].device):
            levels = self.assign_levels(rois[:, 1:]) if len(features) > 1 else None
            return roi_align_gather(features, rois, self.output_size, [1.0 / s for s in self.strides],
                                    self.sampling_ratio, self.aligned, levels=levels)
        if len(features) == 1:
            return self._pool_one(features[0], rois, self.strides[0])
        levels = self.assign_levels(rois[:, 1:])
        out = features[0].new_zeros(len(rois), features[0].shape[1], self.output_size, self.output_size)
        for lvl, (feature, stride) in enumerate(zip(features, self.strides)):  # a few levels, not boxes
            idx = (levels == lvl).nonzero(as_tuple=True)[0]
            out[idx] = self._pool_one(feature, rois[idx], stride).to(out.dtype)
        return out


class TwoMLPHead(nn.Module):
    """Flatten the pooled features, then two fully connected layers with ReLU (Faster R-CNN with FPN)."""

    def __init__(self, in_features: int, hidden: int = 1024) -> None:
        super().__init__()
        self.fc6 = nn.Linear(in_features, hidden)
        self.fc7 = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc7(F.relu(self.fc6(x.flatten(1)))))


class BoxPredictor(nn.Module):
    """Class logits ``[K, C + 1]`` (index ``C`` is background) and class-specific deltas ``[K, 4C]``."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes + 1)
        self.bbox_pred = nn.Linear(in_features, num_classes * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cls_score(x), self.bbox_pred(x)


class RoIHeads(nn.Module):
    """Box branch of Faster R-CNN, batched over images.

    Args:
        in_channels: feature channels; strides: strides of the pooled levels; num_classes: foreground classes.
        pooler_kind / output_size / sampling_ratio / aligned / pooler_impl: see :class:`RoIPooler`.
        hidden: width of the two FC layers.
        fg_iou_thresh: proposals with IoU >= this are foreground (0.5), the rest background.
        batch_size_per_image / positive_fraction: RoI sampling (512 / 0.25).
        bbox_weights: box coder weights (10, 10, 5, 5).
        score_thresh / nms_thresh / detections_per_img: inference filtering.
        topk_candidates: highest-scoring (box, class) candidates per image kept before NMS.
        box_loss: ``"smooth_l1"`` or ``"l1"``; nms_strategy: see :mod:`detkit.models.detection.postprocess`.
    """

    def __init__(
        self,
        in_channels: int,
        strides: Sequence[int],
        num_classes: int,
        pooler_kind: str = "align",
        output_size: int = 7,
        sampling_ratio: int = 2,
        aligned: bool = True,
        hidden: int = 1024,
        fg_iou_thresh: float = 0.5,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        bbox_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        topk_candidates: int = 1000,
        box_loss: str = "smooth_l1",
        nms_strategy: str = "auto",
        pooler_impl: str = "auto",
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.pooler = RoIPooler(strides, output_size, sampling_ratio, pooler_kind, aligned, impl=pooler_impl)
        self.box_head = TwoMLPHead(in_channels * output_size**2, hidden)
        self.box_predictor = BoxPredictor(hidden, num_classes)
        self.box_coder = BoxCoder(bbox_weights)
        self.matcher = Matcher(fg_iou_thresh, fg_iou_thresh, allow_low_quality_matches=False)
        self.sampler = BalancedSampler(batch_size_per_image, positive_fraction)
        self.score_thresh, self.nms_thresh = score_thresh, nms_thresh
        self.detections_per_img, self.topk = detections_per_img, topk_candidates
        self.box_loss, self.nms_strategy = box_loss, nms_strategy

    def _heads(self, features: list[torch.Tensor], img: torch.Tensor, boxes: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        rois = torch.cat([img[:, None].to(boxes.dtype), boxes], dim=1)
        return self.box_predictor(self.box_head(self.pooler(features, rois)))

    def loss(self, features: list[torch.Tensor], proposals: list[torch.Tensor],
             targets: list[dict], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Sample proposals (ground truth appended) and return ``loss_classifier`` and ``loss_box_reg``."""
        device = features[0].device
        gt_boxes, gt_labels, gt_valid = pad_targets(targets, device)
        props, valid = pad_boxes(proposals)
        cand = torch.cat([props, gt_boxes], dim=1)
        cand_valid = torch.cat([valid, gt_valid], dim=1)
        matches = self.matcher(batched_box_iou(gt_boxes, cand), gt_valid)
        pos, neg = self.sampler((matches >= 0) & cand_valid, (matches == Matcher.BACKGROUND) & cand_valid,
                                generator)
        img, idx = (pos | neg).nonzero(as_tuple=True)
        boxes = cand[img, idx]
        is_pos = pos[img, idx]
        gt_idx = matches[img, idx].clamp(min=0)
        labels = torch.where(is_pos, gt_labels[img, gt_idx], torch.full_like(gt_idx, self.num_classes))
        logits, deltas = self._heads(features, img, boxes)
        loss_cls = F.cross_entropy(logits.float(), labels)
        p = is_pos.nonzero(as_tuple=True)[0]
        pred = deltas.view(len(boxes), self.num_classes, 4)[p, labels[p]].float()
        target = self.box_coder.encode(gt_boxes[img[p], gt_idx[p]], boxes[p])
        loss_box = box_regression_loss(pred, target, self.box_loss) / max(1, len(labels))
        return {"loss_classifier": loss_cls, "loss_box_reg": loss_box}

    def predict(self, features: list[torch.Tensor], proposals: list[torch.Tensor],
                image_size: tuple[int, int]) -> Detections:
        """Score, decode, threshold and NMS the proposals of every image: padded :class:`Detections` in input
        pixels (``labels`` contiguous ``0..C-1``)."""
        props, valid = pad_boxes(proposals)
        img, idx = valid.nonzero(as_tuple=True)
        logits, deltas = self._heads(features, img, props[img, idx])
        return self.postprocess_detections(logits, deltas, props, valid, image_size)

    def postprocess_detections(self, logits: torch.Tensor, deltas: torch.Tensor, props: torch.Tensor,
                               valid: torch.Tensor, image_size: tuple[int, int]) -> Detections:
        """Batched post-processing of the box predictor's outputs.

        Args:
            logits: ``[K, C + 1]`` for the ``K`` valid proposals in ``valid.nonzero()`` order (background last).
            deltas: ``[K, 4C]`` class-specific box deltas.
            props: ``[B, P, 4]`` padded proposals (xyxy); valid: ``[B, P]``.
            image_size: ``(H, W)`` to clip to.
        """
        b, p = valid.shape
        c = self.num_classes
        img, idx = valid.nonzero(as_tuple=True)
        scores = props.new_zeros(b, p, c)
        scores[img, idx] = F.softmax(logits.float(), dim=-1)[:, :c].to(scores.dtype)
        boxes = props.new_zeros(b, p, c, 4)
        boxes[img, idx] = self.box_coder.decode(deltas.view(-1, c, 4).to(props.dtype), props[img, idx][:, None])
        boxes = clip_boxes(boxes, *image_size).reshape(b, p * c, 4)
        scores = scores.reshape(b, p * c)
        labels = torch.arange(c, device=props.device).repeat(p)[None].expand(b, -1)
        keep = (valid[..., None].expand(b, p, c).reshape(b, p * c) & (scores > self.score_thresh)
                & ~small_boxes(boxes, 1e-2))
        if p * c > self.topk:
            top = topk_candidates(scores.masked_fill(~keep, -1.0), self.topk)
            boxes, scores = boxes.gather(1, top[..., None].expand(-1, -1, 4)), scores.gather(1, top)
            labels, keep = labels.gather(1, top), keep.gather(1, top)
        return batched_multiclass_nms(boxes, scores, labels, keep, self.nms_thresh, self.detections_per_img,
                                      self.nms_strategy, num_classes=c)
