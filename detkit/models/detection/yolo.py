"""One-stage YOLO-style detector: an anchor-free decoupled head over the backbone's PAN neck.

Design choice: **anchor-free** (YOLOX / YOLOv8-style decoupled head predicting ``ltrb`` distances from each cell
centre), with a **geometric centre-sampling assignment** (FCOS/YOLOX): a cell is positive for a ground-truth box
when its centre lies inside the box and within ``center_radius`` strides of the box centre, on the pyramid level
whose size range fits the box; a box smaller than a cell gets the cell containing its centre; a cell claimed by
several boxes takes the smallest. Why:

* no anchor priors to fit per dataset (a frequent source of silent accuracy loss on custom data such as
  microscopy), and one prediction per cell instead of three;
* the assignment is a pure function of geometry, so it is deterministic, fully vectorised over the batch as
  ``[B, G, A]`` masks, and specified by hand-built tests (a box centred in a known cell at a known stride is
  assigned there);
* localisation quality is learned by the objectness branch, whose target is the IoU of the predicted box with
  its ground truth (IoU-aware objectness, as in VarifocalNet/TOOD), so scores rank well-localised boxes first.

Losses (dense over all ``B x A`` cells, masked, no boolean indexing): BCE on objectness (all cells), BCE on
classes and GIoU or CIoU on boxes (positive cells), each normalised by the number of positives. Inference:
``score = sigmoid(obj) * sigmoid(cls)``, then :class:`~detkit.models.detection.postprocess.PostProcess`
(threshold, top-k, class-aware NMS, cap per image).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from detkit.models.backbones import Backbone
from detkit.models.detection.boxes import batched_box_iou, clip_boxes
from detkit.models.detection.losses import iou_loss, masked_mean
from detkit.models.detection.postprocess import PostProcess
from detkit.models.detection.shape_cache import cached
from detkit.models.necks import conv_bn_act
from detkit.structures import Detections, Targets, as_targets

INF = 1e8


class DecoupledHead(nn.Module):
    """Per level: a shared stem, then separate classification and regression branches (YOLOX).

    Outputs per level ``[B, H*W, 4 + 1 + C]``: raw ``ltrb`` distances, objectness logit, class logits.
    ``dropout > 0`` adds spatial dropout (``Dropout2d``) after each stem; ``norm`` (``"bn"``, ``"gn"`` or
    ``"none"``, :mod:`detkit.models.norm`) follows every convolution of the stems and branches.
    """

    def __init__(self, channels: int, num_classes: int, num_levels: int, prior_prob: float = 0.01,
                 dropout: float = 0.0, norm: str | None = "bn") -> None:
        super().__init__()
        norm = norm or "bn"
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()

        def block(k: int = 3) -> nn.Sequential:
            return conv_bn_act(channels, channels, k, norm=norm)

        self.stems = nn.ModuleList(block(1) for _ in range(num_levels))
        self.cls_convs = nn.ModuleList(nn.Sequential(block(), block()) for _ in range(num_levels))
        self.reg_convs = nn.ModuleList(nn.Sequential(block(), block()) for _ in range(num_levels))
        self.cls_pred = nn.ModuleList(nn.Conv2d(channels, num_classes, 1) for _ in range(num_levels))
        self.reg_pred = nn.ModuleList(nn.Conv2d(channels, 4, 1) for _ in range(num_levels))
        self.obj_pred = nn.ModuleList(nn.Conv2d(channels, 1, 1) for _ in range(num_levels))
        bias = -math.log((1 - prior_prob) / prior_prob)  # start with low scores (focal-loss paper's prior)
        for conv in [*self.cls_pred, *self.obj_pred]:
            nn.init.constant_(conv.bias, bias)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        outs = []
        for i, f in enumerate(feats):
            x = self.dropout(self.stems[i](f))
            c, r = self.cls_convs[i](x), self.reg_convs[i](x)
            out = torch.cat([self.reg_pred[i](r), self.obj_pred[i](r), self.cls_pred[i](c)], dim=1)
            outs.append(out.flatten(2).transpose(1, 2))
        return outs


class CellGrid(NamedTuple):
    """The cells of all levels, concatenated finest first in row-major order (the head's flattened output order):
    centres ``points [A, 2]`` (x, y input pixels), ``strides [A]`` and ``level [A]`` (int64)."""

    points: torch.Tensor
    strides: torch.Tensor
    level: torch.Tensor


def cell_centres(shapes: Sequence[tuple[int, int]], strides: Sequence[int], device: torch.device) -> CellGrid:
    """The :class:`CellGrid` of feature maps of ``shapes`` at ``strides``."""
    points, level_strides, levels = [], [], []
    for i, ((h, w), s) in enumerate(zip(shapes, strides)):
        ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        points.append(torch.stack([xs, ys], -1).reshape(-1, 2).float().add(0.5).mul(s))
        level_strides.append(torch.full((h * w,), float(s), device=device))
        levels.append(torch.full((h * w,), i, dtype=torch.int64, device=device))
    return CellGrid(torch.cat(points), torch.cat(level_strides), torch.cat(levels))


def decode_ltrb(points: torch.Tensor, strides: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    """Raw distances ``[..., A, 4]`` -> ``xyxy`` boxes ``[..., A, 4]``: ``softplus(raw) * stride`` from the cell
    centre to the left, top, right and bottom edges."""
    d = F.softplus(raw.float()) * strides[:, None]
    return torch.cat([points - d[..., :2], points + d[..., 2:]], dim=-1)


def encode_ltrb(points: torch.Tensor, strides: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`decode_ltrb` for boxes containing their cell centre."""
    d = torch.cat([points - boxes[..., :2], boxes[..., 2:] - points], dim=-1) / strides[:, None]
    return torch.log(torch.expm1(d.clamp(min=1e-4)))


def centres_inside(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """``bool [B, G, A]``: which cell centres ``points [A, 2]`` lie strictly inside which ``xyxy`` boxes
    ``[B, G, 4]`` (a centre on an edge is outside)."""
    x, y = points[:, 0], points[:, 1]
    x0, y0, x1, y1 = (boxes[..., i, None] for i in range(4))  # [B, G, 1]
    return (x > x0) & (x < x1) & (y > y0) & (y < y1)


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
        self._range_tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _ranges(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lo [L], hi [L])`` on ``device``, built once (a host-to-device copy per step would wait)."""
        def build() -> tuple[torch.Tensor, torch.Tensor]:
            table = torch.tensor(self.size_ranges, dtype=torch.float32, device=device)
            return table[:, 0], table[:, 1]

        return cached(self._range_tables, str(device), build)

    def __call__(self, points: torch.Tensor, strides: torch.Tensor, level: torch.Tensor, gt_boxes: torch.Tensor,
                 gt_valid: torch.Tensor) -> torch.Tensor:
        """Return ``[B, A]`` int64: the assigned ground-truth index per cell, or -1 for background.

        Args:
            points / strides / level: ``[A, 2]``, ``[A]``, ``[A]`` cell centres, strides, level indices.
            gt_boxes / gt_valid: ``[B, G, 4]`` padded ``xyxy`` boxes and their ``[B, G]`` validity.
        """
        x, y = points[:, 0], points[:, 1]
        x0, y0, x1, y1 = (gt_boxes[..., i, None] for i in range(4))  # [B, G, 1]
        inside = centres_inside(points, gt_boxes)  # [B, G, A]
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        r = self.center_radius * strides
        near = ((x - cx).abs() < r) & ((y - cy).abs() < r)
        centre_cell = ((x - cx).abs() <= strides / 2) & ((y - cy).abs() <= strides / 2)
        in_range = torch.ones_like(inside)
        if self.size_ranges is not None:
            half = torch.maximum(x1 - x0, y1 - y0) / 2  # [B, G, 1]
            lo, hi = (t[level] for t in self._ranges(points.device))
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
        backbone: a :class:`Backbone` with a multi-level neck (``neck: pan`` as in YOLOv5/YOLOX; ``fpn`` works too).
        num_classes: foreground classes ``C``.
        assigner: :class:`CentreSamplingAssigner` (default: radius 2.5, size ranges 0-64-128-inf px).
        box_loss: ``"giou"`` or ``"ciou"``; loss weights ``box_weight``, ``obj_weight``, ``cls_weight``.
        dropout: dropout on the head's stem output (0 disables).
        inference: :class:`~detkit.models.detection.postprocess.PostProcess` (score threshold, top-k, NMS, cap).
        head_norm: the head's normalisation (:class:`DecoupledHead`): ``"bn"`` (also ``None``), ``"gn"`` or ``"none"``.
    """

    #: the head's module path (``DetectionModule(head_lr_mult=...)`` scales its rate)
    HEAD = "head"

    def __init__(self, backbone: Backbone, num_classes: int, assigner: CentreSamplingAssigner | None = None,
                 box_loss: str = "giou", box_weight: float = 5.0, obj_weight: float = 1.0, cls_weight: float = 1.0,
                 dropout: float = 0.0, inference: PostProcess | None = None, head_norm: str | None = "bn") -> None:
        super().__init__()
        if box_loss not in ("giou", "ciou"):
            raise ValueError(f"YOLO box_loss must be 'giou' or 'ciou', got {box_loss!r}")
        if backbone.neck is None:
            raise ValueError("YOLO predicts on several pyramid levels: configure its backbone with a neck "
                             "(neck: pan, as backbone@model.detector.backbone=resnet18_pan)")
        self.backbone = backbone
        self.strides = list(backbone.strides.values())
        self.head = DecoupledHead(backbone.out_channels, num_classes, len(self.strides), dropout=dropout,
                                  norm=head_norm)
        self.num_classes = num_classes
        self.assigner = assigner or CentreSamplingAssigner()
        if self.assigner.size_ranges is not None and len(self.assigner.size_ranges) != len(self.strides):
            raise ValueError(f"YOLO assigner has {len(self.assigner.size_ranges)} size ranges but the backbone gives "
                             f"{len(self.strides)} levels {list(backbone.strides)}: give one range per level")
        self.box_loss, self.weights = box_loss, (box_weight, obj_weight, cls_weight)
        self.inference = inference or PostProcess(score_thresh=0.001, nms_thresh=0.6)
        self._grids: dict[tuple, CellGrid] = {}
        #: Detached health figures of the last ``loss`` call (none for this detector).
        self.diagnostics: dict[str, torch.Tensor] = {}

    def grid(self, shapes: Sequence[tuple[int, int]], device: torch.device) -> CellGrid:
        """The cell grid of these feature shapes, built once per shapes and device."""
        key = (tuple(tuple(s) for s in shapes), str(device))
        return cached(self._grids, key, lambda: cell_centres(shapes, self.strides, device))

    def forward_raw(self, images: torch.Tensor) -> tuple[torch.Tensor, CellGrid]:
        """``images uint8 [B, 3, H, W]`` -> raw outputs ``[B, A, 5 + C]`` and the :class:`CellGrid`."""
        maps = list(self.backbone(images).values())
        return torch.cat(self.head(maps), dim=1), self.grid([tuple(m.shape[-2:]) for m in maps], images.device)

    def loss(self, images: torch.Tensor, targets: Targets | Sequence[dict],
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Named losses ``loss_box``, ``loss_obj``, ``loss_cls`` (already weighted), dense over every cell. The
        assignment is deterministic: ``generator`` is accepted for a uniform detector interface and unused."""
        targets = as_targets(targets, images.device)
        raw, grid = self.forward_raw(images)
        assigned = self.assigner(grid.points, grid.strides, grid.level, targets.boxes, targets.valid)  # [B, A]
        pos = assigned >= 0
        num_pos = pos.sum()
        gt_idx = assigned.clamp(min=0)
        gt_boxes = targets.boxes.gather(1, gt_idx[..., None].expand(-1, -1, 4))  # [B, A, 4]
        gt_labels = targets.labels.gather(1, gt_idx)
        boxes = decode_ltrb(grid.points, grid.strides, raw[..., :4])
        loss_box = masked_mean(iou_loss(boxes, gt_boxes, self.box_loss), pos, num_pos)
        with torch.no_grad():  # IoU-aware objectness: the target is how well the box is localised
            iou = batched_box_iou(boxes[..., None, :], gt_boxes[..., None, :])[..., 0, 0]
            obj_target = torch.where(pos, iou.clamp(min=0.0), torch.zeros_like(iou))
        obj = F.binary_cross_entropy_with_logits(raw[..., 4].float(), obj_target, reduction="none")
        loss_obj = obj.sum() / num_pos.clamp(min=1)
        classes = torch.arange(self.num_classes, device=gt_labels.device)
        cls_target = (gt_labels[..., None] == classes).float()  # one-hot (F.one_hot reads the labels' range back)
        cls = F.binary_cross_entropy_with_logits(raw[..., 5:].float(), cls_target, reduction="none").sum(-1)
        loss_cls = masked_mean(cls, pos, num_pos)
        wb, wo, wc = self.weights
        return {"loss_box": wb * loss_box, "loss_obj": wo * loss_obj, "loss_cls": wc * loss_cls}

    def predict(self, images: torch.Tensor) -> Detections:
        """``images uint8 [B, 3, H, W]`` -> padded :class:`Detections` in input pixels."""
        raw, grid = self.forward_raw(images)
        boxes = clip_boxes(decode_ltrb(grid.points, grid.strides, raw[..., :4]), *images.shape[-2:])
        scores = raw[..., 4:5].float().sigmoid() * raw[..., 5:].float().sigmoid()  # [B, A, C]
        return self.inference(boxes, scores)

    def forward(self, images: torch.Tensor) -> Detections:
        return self.predict(images)
