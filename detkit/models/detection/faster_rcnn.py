"""Two-stage Faster R-CNN: backbone -> region proposal network -> RoI heads."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from detkit.models.backbones import Backbone
from detkit.models.detection.roi_heads import RoIHeads
from detkit.models.detection.rpn import RegionProposalNetwork
from detkit.structures import Detections, Targets, as_targets


class FasterRCNN(nn.Module):
    """Faster R-CNN (Ren et al. 2015), optionally with an FPN (Lin et al. 2017).

    The RPN and RoI heads are given as factories (Hydra ``_partial_`` nodes) and sized here from the backbone's
    shape contract (``out_channels``, ``strides``) and the number of classes, so configs never repeat them.

    Args:
        backbone: :class:`detkit.models.backbones.Backbone` (``neck: fpn`` or a single level with ``neck: none``).
        num_classes: foreground classes ``C`` (labels ``0..C-1``).
        rpn: ``(in_channels) -> RegionProposalNetwork``.
        roi_heads: ``(in_channels, strides, num_classes) -> RoIHeads``; the RoI pooler uses the backbone levels
            except a max-pooled extra level.
    """

    #: the box head's module path (``DetectionModule(head_lr_mult=...)`` scales its rate)
    HEAD = "roi_heads"

    def __init__(self, backbone: Backbone, num_classes: int,
                 rpn: Callable[..., RegionProposalNetwork], roi_heads: Callable[..., RoIHeads]) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.rpn = rpn(in_channels=backbone.out_channels)
        self.rpn.anchor_generator.check_levels(len(backbone.strides))
        self.roi_levels = list(backbone.strides)[: len(backbone.levels)]
        self.roi_heads = roi_heads(in_channels=backbone.out_channels, num_classes=num_classes,
                                   strides=[backbone.strides[n] for n in self.roi_levels])
        #: Detached health figures of the last ``loss`` call (read by the training loop's divergence check).
        self.diagnostics: dict[str, torch.Tensor] = {}

    def loss(self, images: torch.Tensor, targets: Targets | Sequence[dict],
             generator: torch.Generator | None = None,
             background_weights: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """``images uint8 [B, 3, H, W]`` and padded :class:`~detkit.data.collate.Targets` (``boxes`` xyxy input
        pixels; a list of per-image dicts is padded once) -> named losses ``loss_objectness``,
        ``loss_rpn_box_reg``, ``loss_classifier``, ``loss_box_reg``. Anchor and RoI sampling draw from
        ``generator`` (the global RNG if None). ``background_weights`` weights the sampled background RoIs'
        classification loss (:meth:`RoIHeads.loss`; self-training's soft background)."""
        targets = as_targets(targets, images.device)
        features = self.backbone(images)
        proposals, rpn_losses = self.rpn(features, tuple(images.shape[-2:]), targets, generator)
        self.diagnostics = {"nonfinite_proposals": proposals.nonfinite}
        roi_losses = self.roi_heads.loss([features[n] for n in self.roi_levels], proposals, targets, generator,
                                         background_weights)
        return {**rpn_losses, **roi_losses}

    def predict(self, images: torch.Tensor) -> Detections:
        """``images uint8 [B, 3, H, W]`` -> padded :class:`Detections` in input pixels."""
        return self.predict_with_features(images)[0]

    def predict_with_features(self, images: torch.Tensor) -> tuple[Detections, list[torch.Tensor]]:
        """:meth:`predict`, and the feature maps the RoI heads pooled from (finest first), for a caller that scores
        other boxes on the same images (:meth:`RoIHeads.background_probability`)."""
        image_size = tuple(images.shape[-2:])
        features = self.backbone(images)
        proposals, _ = self.rpn(features, image_size)
        pooled = [features[n] for n in self.roi_levels]
        return self.roi_heads.predict(pooled, proposals, image_size), pooled

    def forward(self, images: torch.Tensor) -> Detections:
        return self.predict(images)
