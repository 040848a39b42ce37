"""RoI heads: pool features for proposals, classify them and refine their boxes (Fast/Faster R-CNN).

Fixed-shape: training samples exactly ``batch_size_per_image`` RoIs per image (proposals and ground truth,
positives first), so the box head always sees ``B x batch_size_per_image`` RoIs; inference runs the head on all
``P`` padded proposals. Losses are masked sums; nothing waits for the host.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align, roi_pool

from detkit.models.detection.box_coder import BoxCoder
from detkit.models.detection.boxes import batched_box_iou, box_area, clip_boxes
from detkit.models.detection.losses import box_regression_loss, masked_mean
from detkit.models.detection.matcher import Matcher
from detkit.models.detection.postprocess import PostProcess
from detkit.models.detection.roi_align import roi_align_gather
from detkit.models.detection.sampler import BalancedSampler
from detkit.models.norm import check_norm, norm2d
from detkit.structures import Detections, Proposals, Targets


class RoIPooler(nn.Module):
    """RoIAlign (default) or RoIPool over one or several feature levels.

    With several levels each RoI is pooled from level ``k = floor(4 + log2(sqrt(area) / 224))`` (FPN paper,
    eq. 1), clamped to the available levels; non-finite or empty boxes go to the canonical level and pool zeros or
    clamped pixels, never an out-of-range index.

    Args:
        strides: stride of each pooled level, finest first.
        output_size: pooled side length.
        sampling_ratio: RoIAlign samples per bin (0 = adaptive, torchvision kernel only).
        kind: ``"align"`` or ``"pool"``.
        aligned: RoIAlign with the half-pixel correction (detectron2's ROIAlignV2); torchvision uses False.
        impl: RoIAlign kernel: ``"gather"`` (:func:`detkit.models.detection.roi_align.roi_align_gather`: one call for
            every RoI of every level, no data-dependent shapes), ``"torchvision"`` (``torchvision.ops.roi_align``;
            with several levels one call per level on the RoIs of that level, found with ``nonzero``: a host
            synchronisation per level on a GPU), or ``"auto"``: gather (the faster on CPU and the sync-free one on
            GPU; BENCHMARKS.md). Gather needs ``sampling_ratio > 0``.
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

    @property
    def use_gather(self) -> bool:
        if self.impl == "auto":
            return self.kind == "align" and self.sampling_ratio > 0
        return self.impl == "gather"

    def assign_levels(self, boxes: torch.Tensor) -> torch.Tensor:
        """``[..., 4]`` -> index into the pooled levels, ``[...]`` int64 (non-finite boxes: the canonical level)."""
        size = box_area(boxes).sqrt()
        k = torch.floor(self.canonical_level + torch.log2(size / self.canonical_scale + 1e-8))
        k = torch.nan_to_num(k, nan=float(self.canonical_level), posinf=float(self.levels[-1]),
                             neginf=float(self.levels[0]))
        return (k.clamp(min=self.levels[0], max=self.levels[-1]) - self.levels[0]).to(torch.int64)

    def _pool_one(self, feature: torch.Tensor, rois: torch.Tensor, stride: int) -> torch.Tensor:
        if self.kind == "align":
            return roi_align(feature, rois, self.output_size, spatial_scale=1.0 / stride,
                             sampling_ratio=self.sampling_ratio, aligned=self.aligned)
        return roi_pool(feature, rois, self.output_size, spatial_scale=1.0 / stride)

    def forward(self, features: list[torch.Tensor], boxes: torch.Tensor) -> torch.Tensor:
        """``boxes [B, R, 4]`` (xyxy input pixels, ``R`` per image) -> pooled ``[B * R, C, S, S]``."""
        b, r = boxes.shape[:2]
        image = torch.arange(b, device=boxes.device, dtype=torch.float32)[:, None].expand(b, r).reshape(b * r, 1)
        flat = torch.nan_to_num(boxes.reshape(b * r, 4).float(), nan=0.0, posinf=0.0, neginf=0.0)
        rois = torch.cat([image, flat], dim=1)
        if self.use_gather:
            levels = self.assign_levels(flat) if len(features) > 1 else None
            return roi_align_gather(features, rois, self.output_size, [1.0 / s for s in self.strides],
                                    self.sampling_ratio, self.aligned, levels=levels)
        rois = rois.to(features[0].dtype)
        if len(features) == 1:
            return self._pool_one(features[0], rois, self.strides[0])
        levels = self.assign_levels(flat)
        if torch.compiler.is_exporting():  # a traced graph has no data-dependent subsets: pool every RoI at every
            out = None                     # level and keep each RoI's own level (a few x the work, fixed shapes)
            for lvl, (feature, stride) in enumerate(zip(features, self.strides)):
                pooled = self._pool_one(feature, rois, stride)
                out = pooled if out is None else torch.where((levels == lvl)[:, None, None, None], pooled, out)
            return out
        out = features[0].new_zeros(len(rois), features[0].shape[1], self.output_size, self.output_size)
        for lvl, (feature, stride) in enumerate(zip(features, self.strides)):  # a few levels, not boxes
            idx = (levels == lvl).nonzero(as_tuple=True)[0]  # data-dependent: torchvision's kernel takes a subset
            out[idx] = self._pool_one(feature, rois[idx], stride).to(out.dtype)
        return out


class ConvFCHead(nn.Module):
    """The box head over pooled ``[K, in_channels, r, r]`` features: ``convs`` 3x3 convolutions (each followed by
    ``norm`` and ReLU), then ``fcs`` fully connected layers with ReLU (each followed by dropout when
    ``dropout > 0``). Output ``[K, hidden]``. detectron2's ``FastRCNNConvFCHead``: ``convs=0, fcs=2`` is Faster
    R-CNN with FPN's two-layer MLP (:class:`TwoMLPHead`, the default); ``convs=4, fcs=1, norm="gn"`` is the "4conv1fc"
    head of detectron2's GN configs and of MoCo's and DenseCL's detection transfer (SyncBN there), and of
    torchvision's ``fasterrcnn_resnet50_fpn_v2`` (BatchNorm).

    Args:
        in_channels, resolution: the pooled features' channels and side (filled in by :class:`RoIHeads`).
        convs, conv_channels: the convolution stack.
        fcs, hidden: the fully connected layers and their width (the fc layers are ``fc6``, ``fc7``, ...).
        norm: after each convolution: ``"none"``, ``"bn"`` or ``"gn"`` (:mod:`detkit.models.norm`); ``None``: none.
        dropout: after each fully connected layer.
    """

    def __init__(self, in_channels: int, resolution: int, convs: int = 0, conv_channels: int = 128, fcs: int = 2,
                 hidden: int = 1024, norm: str | None = "none", dropout: float = 0.0) -> None:
        super().__init__()
        norm = check_norm(norm or "none", "box head")
        if fcs < 1:
            raise ValueError(f"the box head needs at least one fully connected layer, got fcs={fcs}")
        layers: list[nn.Module] = []
        for i in range(convs):
            conv = nn.Conv2d(in_channels if i == 0 else conv_channels, conv_channels, 3, padding=1,
                             bias=norm == "none")
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            layers += [conv, norm2d(norm, conv_channels), nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*layers)  # empty (no parameters) for convs=0
        width = (conv_channels if convs else in_channels) * resolution ** 2
        self.fc_names = [f"fc{6 + i}" for i in range(fcs)]  # fc6, fc7: the names of Faster R-CNN's MLP head
        for i, name in enumerate(self.fc_names):
            setattr(self, name, nn.Linear(width if i == 0 else hidden, hidden))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.out_features = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.convs(x).flatten(1)
        for name in self.fc_names:
            x = self.dropout(F.relu(getattr(self, name)(x)))
        return x


class TwoMLPHead(ConvFCHead):
    """Faster R-CNN with FPN's box head: flatten, then two fully connected layers with ReLU (dropout after each
    when ``dropout > 0``); :class:`ConvFCHead` with no convolution."""

    def __init__(self, in_channels: int, resolution: int, hidden: int = 1024, dropout: float = 0.0) -> None:
        super().__init__(in_channels, resolution, convs=0, fcs=2, hidden=hidden, dropout=dropout)


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
    """Box branch of Faster R-CNN, batched over images. Configured by sub-nodes, each a swappable part:

    Args:
        in_channels: feature channels; strides: strides of the pooled levels; num_classes: foreground classes
            (the three are filled in by :class:`~detkit.models.detection.faster_rcnn.FasterRCNN`).
        pooler: ``(strides) -> RoIPooler`` (default RoIAlign 7x7, sampling ratio 2, aligned).
        box_head: ``(in_channels, resolution) -> nn.Module`` with ``out_features`` (default :class:`TwoMLPHead`, 1024
            wide; :class:`ConvFCHead` adds normalised convolutions before it).
        sampler: RoI sampling (default 128 per image, 25% positives, as Faster R-CNN's own recipe; detectron2
            samples 512, which on images with a few objects is ~99% background).
        fg_iou_thresh: proposals with IoU >= this are foreground (0.5), the rest background.
        bbox_weights: box coder weights (10, 10, 5, 5).
        box_loss: ``"smooth_l1"`` or ``"l1"``.
        inference: :class:`~detkit.models.detection.postprocess.PostProcess` (score threshold, top-k, NMS, cap).
    """

    def __init__(
        self,
        in_channels: int,
        strides: Sequence[int],
        num_classes: int,
        pooler: Callable[..., RoIPooler] | None = None,
        box_head: Callable[..., nn.Module] | None = None,
        sampler: BalancedSampler | None = None,
        fg_iou_thresh: float = 0.5,
        bbox_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
        box_loss: str = "smooth_l1",
        inference: PostProcess | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.pooler = (pooler or RoIPooler)(strides=strides)
        self.box_head = (box_head or TwoMLPHead)(in_channels=in_channels, resolution=self.pooler.output_size)
        self.box_predictor = BoxPredictor(self.box_head.out_features, num_classes)
        self.box_coder = BoxCoder(bbox_weights)
        self.matcher = Matcher(fg_iou_thresh, fg_iou_thresh, allow_low_quality_matches=False)
        self.sampler = sampler or BalancedSampler(128, 0.25)
        self.box_loss = box_loss
        self.inference = inference or PostProcess()

    def _heads(self, features: list[torch.Tensor], boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``boxes [B, R, 4]`` -> class logits ``[B, R, C + 1]`` and deltas ``[B, R, C, 4]``."""
        b, r = boxes.shape[:2]
        logits, deltas = self.box_predictor(self.box_head(self.pooler(features, boxes)))
        return logits.view(b, r, -1), deltas.view(b, r, self.num_classes, 4)

    def loss(self, features: list[torch.Tensor], proposals: Proposals, targets: Targets,
             generator: torch.Generator | None = None,
             background_weights: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Sample ``batch_size_per_image`` RoIs per image from the proposals with the ground truth appended, and
        return ``loss_classifier`` (cross-entropy over the sampled RoIs) and ``loss_box_reg`` (over the sampled
        positives, divided by the number sampled, as torchvision).

        ``background_weights`` (Soft Teacher, Xu et al. 2021; for pseudo-labels): ``boxes [B, S, 4]`` (the sampled
        RoIs, xyxy input pixels) -> ``[B, S]`` weights in [0, 1]. Each sampled *background* RoI's cross-entropy is
        weighted by it (foreground RoIs by 1) and ``loss_classifier`` is the weighted sum over the weights' sum, so a
        background RoI the teacher thinks holds an object it did not pseudo-label counts little."""
        cand = torch.cat([proposals.boxes, targets.boxes], dim=1)  # [B, P + G, 4]
        cand_valid = torch.cat([proposals.valid, targets.valid], dim=1)
        matches = self.matcher(batched_box_iou(targets.boxes, cand), targets.valid)  # [B, P + G]
        sample = self.sampler((matches >= 0) & cand_valid, (matches == Matcher.BACKGROUND) & cand_valid, generator)
        boxes = cand.gather(1, sample.index[..., None].expand(-1, -1, 4))  # [B, S, 4]
        gt_idx = matches.gather(1, sample.index).clamp(min=0)
        gt_labels = targets.labels.gather(1, gt_idx)
        labels = torch.where(sample.positive, gt_labels, torch.full_like(gt_labels, self.num_classes))
        logits, deltas = self._heads(features, boxes)
        count = sample.valid.sum()
        cls = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none").view_as(labels)
        pred = deltas.gather(2, gt_labels[..., None, None].expand(-1, -1, 1, 4)).squeeze(2)  # the true class's
        target = self.box_coder.encode(targets.boxes.gather(1, gt_idx[..., None].expand(-1, -1, 4)), boxes)
        box = box_regression_loss(pred, target, self.box_loss)
        if background_weights is None:
            loss_cls = masked_mean(cls, sample.valid, count)
        else:  # mmdetection's Soft Teacher: label weights 1 (foreground) / teacher's background score, sum / weights
            soft = background_weights(boxes).detach().float().clamp(0.0, 1.0)
            weight = torch.where(sample.valid, torch.where(sample.positive, torch.ones_like(soft), soft), 0.0)
            loss_cls = torch.where(sample.valid, cls * weight, 0.0).sum() / weight.sum().clamp(min=1.0)
        return {"loss_classifier": loss_cls, "loss_box_reg": masked_mean(box, sample.positive, count)}

    def background_probability(self, features: list[torch.Tensor], boxes: torch.Tensor) -> torch.Tensor:
        """``boxes [B, R, 4]`` (xyxy input pixels) -> this head's background probability of each, ``[B, R]`` float32
        (the softmax's last class)."""
        logits, _ = self._heads(features, boxes)
        return F.softmax(logits.float(), dim=-1)[..., self.num_classes]

    def predict(self, features: list[torch.Tensor], proposals: Proposals, image_size: tuple[int, int]
                ) -> Detections:
        """Score, decode, threshold and NMS all ``P`` proposals of every image: padded :class:`Detections` in input
        pixels (``labels`` contiguous ``0..C-1``)."""
        logits, deltas = self._heads(features, proposals.boxes)
        return self.postprocess_detections(logits, deltas, proposals, image_size)

    def postprocess_detections(self, logits: torch.Tensor, deltas: torch.Tensor, proposals: Proposals,
                               image_size: tuple[int, int]) -> Detections:
        """``logits [B, P, C + 1]`` (background last), ``deltas [B, P, C, 4]`` for ``proposals`` -> detections:
        softmax scores, class-specific boxes decoded in float32 and clipped, then :attr:`inference`."""
        scores = F.softmax(logits.float(), dim=-1)[..., : self.num_classes]
        boxes = clip_boxes(self.box_coder.decode(deltas, proposals.boxes[:, :, None]), *image_size)
        return self.inference(boxes, scores, proposals.valid)
