"""One-stage YOLO-style detector: a PAN neck over the shared ResNet encoder and an anchor-free decoupled head.

Design choice: **anchor-free** (YOLOX / YOLOv8-style decoupled head predicting ``ltrb`` distances from each cell
centre), with a **geometric centre-sampling assignment** (FCOS/YOLOX): a cell is positive for a ground-truth box
when its centre lies inside the box and within ``center_radius`` strides of the box centre, on the pyramid level
whose size range fits the box; a cell claimed by several boxes takes the smallest. Why:

* no anchor priors to fit per dataset (a frequent source of silent accuracy loss on custom data such as
  microscopy), and one prediction per cell instead of three;
* the assignment is a pure function of geometry, so it is deterministic, fully vectorised over the batch as
  ``[B, G, A]`` masks, and specified by hand-built tests (a box centred in a known cell at a known stride is
  assigned there);
* localisation quality is learned by the objectness branch, whose target is the IoU of the predicted box with
  its ground truth (IoU-aware objectness, as in VarifocalNet/TOOD), so scores rank well-localised boxes first.

Losses: BCE on objectness (all cells), BCE on classes (positive cells), GIoU or CIoU (``torchvision.ops``) on the
boxes of positive cells, normalised by the number of positives. Inference: ``score = sigmoid(obj) *
sigmoid(cls)``, score threshold, top-k per image, class-aware NMS (per-device strategy of
:mod:`detkit.models.detection.postprocess`), capped detections per image.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import complete_box_iou_loss, generalized_box_iou_loss

from detkit.models.backbones import Backbone
from detkit.models.detection.boxes import batched_box_iou, clip_boxes, pad_targets
from detkit.models.detection.postprocess import Detections, batched_multiclass_nms, topk_candidates

INF = 1e8


def conv_bn_act(cin: int, cout: int, k: int = 3, s: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout), nn.SiLU(inplace=True))


class PANNeck(nn.Module):
    """Path-aggregation neck (PANet / YOLOv5-style, light): top-down FPN merge, then a bottom-up pass.

    Input: encoder maps ``c3, c4, c5``; output: three maps of ``channels`` at strides 8, 16, 32 (finest first).
    """

    def __init__(self, in_channels: Sequence[int], channels: int = 96) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(conv_bn_act(c, channels, 1) for c in in_channels)
        self.top_down = nn.ModuleList(conv_bn_act(channels, channels) for _ in in_channels[:-1])
        self.down = nn.ModuleList(conv_bn_act(channels, channels, 3, 2) for _ in in_channels[:-1])
        self.bottom_up = nn.ModuleList(conv_bn_act(channels, channels) for _ in in_channels[:-1])

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        lat = [layer(f) for layer, f in zip(self.lateral, feats)]
        td = [lat[-1]]
        for i in range(len(lat) - 2, -1, -1):
            up = F.interpolate(td[0], size=lat[i].shape[-2:], mode="nearest")
            td.insert(0, self.top_down[i](lat[i] + up))
        out = [td[0]]
        for i in range(1, len(td)):
            out.append(self.bottom_up[i - 1](td[i] + self.down[i - 1](out[-1])))
        return out


class DecoupledHead(nn.Module):
    """Per level: a shared stem, then separate classification and regression branches (YOLOX).

    Outputs per level ``[B, H*W, 4 + 1 + C]``: raw ``ltrb`` distances, objectness logit, class logits.
    """

    def __init__(self, channels: int, num_classes: int, num_levels: int, prior_prob: float = 0.01) -> None:
        super().__init__()
        self.stems = nn.ModuleList(conv_bn_act(channels, channels, 1) for _ in range(num_levels))
        self.cls_convs = nn.ModuleList(nn.Sequential(conv_bn_act(channels, channels), conv_bn_act(channels, channels))
                                       for _ in range(num_levels))
        self.reg_convs = nn.ModuleList(nn.Sequential(conv_bn_act(channels, channels), conv_bn_act(channels, channels))
                                       for _ in range(num_levels))
        self.cls_pred = nn.ModuleList(nn.Conv2d(channels, num_classes, 1) for _ in range(num_levels))
        self.reg_pred = nn.ModuleList(nn.Conv2d(channels, 4, 1) for _ in range(num_levels))
        self.obj_pred = nn.ModuleList(nn.Conv2d(channels, 1, 1) for _ in range(num_levels))
        bias = -math.log((1 - prior_prob) / prior_prob)  # start with low scores (focal-loss paper's prior)
        for conv in [*self.cls_pred, *self.obj_pred]:
            nn.init.constant_(conv.bias, bias)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        outs = []
        for i, f in enumerate(feats):
            x = self.stems[i](f)
            c, r = self.cls_convs[i](x), self.reg_convs[i](x)
            out = torch.cat([self.reg_pred[i](r), self.obj_pred[i](r), self.cls_pred[i](c)], dim=1)
            outs.append(out.flatten(2).transpose(1, 2))
        return outs


def cell_centres(shapes: Sequence[tuple[int, int]], strides: Sequence[int], device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell centres ``[A, 2]`` (x, y in input pixels) and the stride of each cell ``[A]``, levels concatenated in
    row-major order (matching the head's flattened output)."""
    points, level_strides = [], []
    for (h, w), s in zip(shapes, strides):
        ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        points.append(torch.stack([xs, ys], -1).reshape(-1, 2).float().add(0.5).mul(s))
        level_strides.append(torch.full((h * w,), float(s), device=device))
    return torch.cat(points), torch.cat(level_strides)


def decode_ltrb(points: torch.Tensor, strides: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    """Raw distances ``[..., A, 4]`` -> ``xyxy`` boxes ``[..., A, 4]``: ``softplus(raw) * stride`` from the cell
    centre to the left, top, right and bottom edges."""
    d = F.softplus(raw.float()) * strides[:, None]
    return torch.cat([points - d[..., :2], points + d[..., 2:]], dim=-1)


def encode_ltrb(points: torch.Tensor, strides: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`decode_ltrb` for boxes containing their cell centre."""
    d = torch.cat([points - boxes[..., :2], boxes[..., 2:] - points], dim=-1) / strides[:, None]
    return torch.log(torch.expm1(d.clamp(min=1e-4)))


class CentreSamplingAssigner:
    """Assigns cells to ground-truth boxes by geometry (see the module docstring), batched.

    Args:
        center_radius: a positive cell's centre is within this many strides of the box centre.
        size_ranges: per level ``(lo, hi)`` of the box's longer half-side ``max(w, h) / 2`` in pixels; ``None``
            assigns every box on every level.
    """

    def __init__(self, center_radius: float = 2.5,
                 size_ranges: Sequence[Sequence[float]] | None = ((0, 64), (64, 128), (128, INF))) -> None:
        self.center_radius = center_radius
        self.size_ranges = [tuple(float(v) for v in r) for r in size_ranges] if size_ranges is not None else None
        if self.size_ranges is not None:
            edges = [r[0] for r in self.size_ranges] + [self.size_ranges[-1][1]]
            if edges[0] != 0 or any(a[1] != b[0] for a, b in zip(self.size_ranges, self.size_ranges[1:])) \
                    or edges[-1] < 1e6:
                raise ValueError(f"YOLO size_ranges must tile [0, inf) level after level (each range starting where "
                                 f"the previous one ends, the last ending at >= 1e6), got {size_ranges}: a box "
                                 "whose size falls in a gap would never be learned")

    def __call__(self, points: torch.Tensor, strides: torch.Tensor, level: torch.Tensor, gt_boxes: torch.Tensor,
                 gt_valid: torch.Tensor) -> torch.Tensor:
        """Return ``[B, A]`` int64: the assigned ground-truth index per cell, or -1 for background.

        Args:
            points / strides / level: ``[A, 2]``, ``[A]``, ``[A]`` cell centres, strides, level indices.
            gt_boxes / gt_valid: ``[B, G, 4]`` padded ``xyxy`` boxes and their ``[B, G]`` validity.
        """
        x, y = points[:, 0], points[:, 1]
        x0, y0, x1, y1 = (gt_boxes[..., i, None] for i in range(4))  # [B, G, 1]
        inside = (x > x0) & (x < x1) & (y > y0) & (y < y1)  # [B, G, A]
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        r = self.center_radius * strides
        near = ((x - cx).abs() < r) & ((y - cy).abs() < r)
        centre_cell = ((x - cx).abs() <= strides / 2) & ((y - cy).abs() <= strides / 2)
        in_range = torch.ones_like(inside)
        if self.size_ranges is not None:
            half = torch.maximum(x1 - x0, y1 - y0) / 2  # [B, G, 1]
            lo = torch.tensor([r[0] for r in self.size_ranges], device=points.device)[level]
            hi = torch.tensor([r[1] for r in self.size_ranges], device=points.device)[level]
            in_range = (half >= lo) & (half < hi)
        ok = inside & near & in_range
        # A box no cell centre falls inside (smaller than a stride) gets the cell containing its centre, on the
        # level its size range picks; decided after the range filter, so every box has at least one cell.
        ok |= centre_cell & in_range & ~ok.any(-1, keepdim=True)
        ok &= gt_valid[..., None]
        area = ((x1 - x0) * (y1 - y0)).expand_as(ok)
        area = torch.where(ok, area, torch.full_like(area, INF))
        best_area, best = area.min(dim=1)  # a cell claimed by several boxes takes the smallest
        return torch.where(best_area < INF, best, torch.full_like(best, -1))


class YOLO(nn.Module):
    """YOLO-style one-stage detector.

    Args:
        backbone: a :class:`Backbone` without FPN (``fpn: false``); the detector reads the encoder's ``c3..c5``
            maps and aggregates them with its own PAN neck.
        num_classes: foreground classes ``C``.
        neck_channels: PAN width.
        center_radius, size_ranges: see :class:`CentreSamplingAssigner`.
        box_loss: ``"giou"`` or ``"ciou"``; loss weights ``box_weight``, ``obj_weight``, ``cls_weight``.
        score_thresh, nms_thresh, topk_candidates, detections_per_img, nms_strategy: inference.
    """

    LEVELS = ("c3", "c4", "c5")

    def __init__(self, backbone: Backbone, num_classes: int, neck_channels: int = 96, center_radius: float = 2.5,
                 size_ranges: Sequence[Sequence[float]] | None = ((0, 64), (64, 128), (128, INF)),
                 box_loss: str = "giou", box_weight: float = 5.0, obj_weight: float = 1.0, cls_weight: float = 1.0,
                 score_thresh: float = 0.05, nms_thresh: float = 0.6, topk_candidates: int = 1000,
                 detections_per_img: int = 100, nms_strategy: str = "auto") -> None:
        super().__init__()
        if box_loss not in ("giou", "ciou"):
            raise ValueError(f"YOLO box_loss must be 'giou' or 'ciou', got {box_loss!r}")
        if backbone.fpn is not None:
            raise ValueError("YOLO builds its own PAN neck: configure its backbone with fpn: false (an FPN there "
                             "would hold parameters that never train)")
        self.backbone = backbone
        enc = backbone.encoder
        self.strides = [enc.strides[lv] for lv in self.LEVELS]
        self.neck = PANNeck([enc.channels[lv] for lv in self.LEVELS], neck_channels)
        self.head = DecoupledHead(neck_channels, num_classes, len(self.LEVELS))
        self.num_classes = num_classes
        self.assigner = CentreSamplingAssigner(center_radius, size_ranges)
        self.box_loss, self.weights = box_loss, (box_weight, obj_weight, cls_weight)
        self.score_thresh, self.nms_thresh, self.topk = score_thresh, nms_thresh, topk_candidates
        self.detections_per_img, self.nms_strategy = detections_per_img, nms_strategy

    def forward_raw(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``images uint8 [B, 3, H, W]`` -> raw outputs ``[B, A, 5 + C]``, cell centres ``[A, 2]``, strides ``[A]``
        and level index ``[A]``."""
        enc = self.backbone.encoder
        feats = enc.features(enc.normalize(images))
        maps = self.neck([feats[lv] for lv in self.LEVELS])
        outs = self.head(maps)
        points, strides = cell_centres([m.shape[-2:] for m in maps], self.strides, images.device)
        level = torch.cat([torch.full((o.shape[1],), i, device=images.device) for i, o in enumerate(outs)])
        return torch.cat(outs, dim=1), points, strides, level

    def loss(self, images: torch.Tensor, targets: list[dict],
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Named losses ``loss_box``, ``loss_obj``, ``loss_cls`` (already weighted). The assignment is
        deterministic: ``generator`` is accepted for a uniform detector interface and unused."""
        raw, points, strides, level = self.forward_raw(images)
        gt_boxes, gt_labels, gt_valid = pad_targets(targets, images.device)
        assigned = self.assigner(points, strides, level, gt_boxes, gt_valid)  # [B, A]
        pos = assigned >= 0
        num_pos = pos.sum().clamp(min=1).float()
        boxes = decode_ltrb(points, strides, raw[..., :4])
        img, idx = pos.nonzero(as_tuple=True)
        gt_idx = assigned[img, idx]
        pred_pos, target_pos = boxes[img, idx], gt_boxes[img, gt_idx]
        loss_fn = generalized_box_iou_loss if self.box_loss == "giou" else complete_box_iou_loss
        loss_box = loss_fn(pred_pos, target_pos, reduction="sum") / num_pos
        obj_target = torch.zeros_like(raw[..., 4], dtype=torch.float32)
        with torch.no_grad():  # IoU-aware objectness: the target is how well the box is localised
            iou = batched_box_iou(pred_pos[:, None], target_pos[:, None]).reshape(-1)
        obj_target[img, idx] = iou.clamp(min=0.0).to(obj_target.dtype)
        loss_obj = F.binary_cross_entropy_with_logits(raw[..., 4].float(), obj_target, reduction="sum") / num_pos
        cls_target = F.one_hot(gt_labels[img, gt_idx], self.num_classes).float()
        loss_cls = F.binary_cross_entropy_with_logits(raw[img, idx, 5:].float(), cls_target,
                                                      reduction="sum") / num_pos
        wb, wo, wc = self.weights
        return {"loss_box": wb * loss_box, "loss_obj": wo * loss_obj, "loss_cls": wc * loss_cls}

    def predict(self, images: torch.Tensor) -> Detections:
        """``images uint8 [B, 3, H, W]`` -> padded :class:`Detections` in input pixels."""
        raw, points, strides, _ = self.forward_raw(images)
        b, a, _ = raw.shape
        c = self.num_classes
        boxes = clip_boxes(decode_ltrb(points, strides, raw[..., :4]), *images.shape[-2:])
        scores = (raw[..., 4:5].float().sigmoid() * raw[..., 5:].float().sigmoid()).reshape(b, a * c)
        labels = torch.arange(c, device=raw.device).repeat(a)[None].expand(b, -1)
        top = topk_candidates(scores, self.topk)
        scores, labels = scores.gather(1, top), labels.gather(1, top)
        boxes = boxes.gather(1, (top // c)[..., None].expand(-1, -1, 4))
        return batched_multiclass_nms(boxes, scores, labels, scores > self.score_thresh, self.nms_thresh,
                                      self.detections_per_img, self.nms_strategy, num_classes=c)

    def forward(self, images: torch.Tensor) -> Detections:
        return self.predict(images)
