"""Batched post-processing: top-k, class-aware NMS over a batch, capped detections per image.

NMS cost grows with the square of the boxes in one call. On a CPU, one ``batched_nms`` call over a whole batch's
candidates is several times slower than one call per image (measured in ``scripts/bench_postprocess_eval.py``);
on a GPU one call for the whole batch avoids per-image launches and host synchronisation. ``strategy="auto"``
picks per device; both strategies keep exactly the same boxes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torchvision.ops import batched_nms

STRATEGIES = ("auto", "per_image", "batched")


class Detections(NamedTuple):
    """Padded per-image detections, sorted by decreasing score: ``boxes [B, K, 4]`` xyxy, ``scores [B, K]``,
    ``labels [B, K]`` int64 and ``valid [B, K]`` bool (False for padding)."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor

    def to_list(self) -> list[dict[str, torch.Tensor]]:
        """Per image ``{"boxes" [n, 4], "scores" [n], "labels" [n]}``."""
        return [{"boxes": b[v], "scores": s[v], "labels": c[v]}
                for b, s, c, v in zip(self.boxes, self.scores, self.labels, self.valid)]


def resolve_strategy(strategy: str, device: torch.device) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"nms strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "auto":
        return "per_image" if device.type == "cpu" else "batched"
    return strategy


def topk_candidates(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[B, min(k, N)]`` of each image's highest scores (``scores [B, N]``)."""
    return scores.topk(min(k, scores.shape[1]), dim=1).indices


def _pack(keep_img: torch.Tensor, keep_idx: torch.Tensor, batch: int, max_det: int, boxes: torch.Tensor,
          scores: torch.Tensor, labels: torch.Tensor) -> Detections:
    """Scatter kept ``(image, index)`` pairs, sorted by decreasing score, into padded ``[B, max_det]`` slots."""
    order = torch.sort(keep_img, stable=True).indices  # group by image, keep score order inside each image
    keep_img, keep_idx = keep_img[order], keep_idx[order]
    counts = torch.bincount(keep_img, minlength=batch)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(keep_img), device=keep_img.device) - starts[keep_img]
    sel = rank < max_det
    keep_img, keep_idx, rank = keep_img[sel], keep_idx[sel], rank[sel]
    out_boxes = boxes.new_zeros(batch, max_det, 4)
    out_scores = scores.new_zeros(batch, max_det)
    out_labels = labels.new_zeros(batch, max_det)
    valid = torch.zeros(batch, max_det, dtype=torch.bool, device=boxes.device)
    out_boxes[keep_img, rank] = boxes[keep_img, keep_idx]
    out_scores[keep_img, rank] = scores[keep_img, keep_idx]
    out_labels[keep_img, rank] = labels[keep_img, keep_idx]
    valid[keep_img, rank] = True
    return Detections(out_boxes, out_scores, out_labels, valid)


def batched_multiclass_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor,
    iou_threshold: float,
    max_det: int,
    strategy: str = "auto",
    num_classes: int | None = None,
) -> Detections:
    """Class-aware NMS for every image of a batch.

    Args:
        boxes: ``[B, N, 4]`` xyxy candidates.
        scores: ``[B, N]``.
        labels: ``[B, N]`` int64 class of each candidate (NMS only suppresses within a class).
        valid: ``[B, N]`` bool, candidates to consider (score threshold, size filter, padding).
        iou_threshold: suppression IoU.
        max_det: detections kept per image, highest scores first.
        strategy: ``"per_image"`` (one ``batched_nms`` per image), ``"batched"`` (one call for the batch, image
            index folded into the class index) or ``"auto"`` (per device).
        num_classes: an upper bound on ``labels``; lets the batched strategy skip a host synchronisation.

    Returns:
        :class:`Detections` padded to ``max_det``. Keeps the same boxes as a per-image loop of
        ``torchvision.ops.batched_nms`` followed by taking the first ``max_det``.
    """
    batch, n = scores.shape
    strategy = resolve_strategy(strategy, boxes.device)
    if strategy == "batched":
        img, idx = valid.nonzero(as_tuple=True)
        bound = num_classes if num_classes is not None else int(labels.max().item()) + 1 if labels.numel() else 1
        group = img * bound + labels[img, idx]
        keep = batched_nms(boxes[img, idx].float(), scores[img, idx].float(), group, iou_threshold)
        return _pack(img[keep], idx[keep], batch, max_det, boxes, scores, labels)
    kept_img, kept_idx = [], []
    for b in range(batch):  # torchvision has no batched kernel whose cost stays linear in the number of images
        idx = valid[b].nonzero(as_tuple=True)[0]
        keep = batched_nms(boxes[b, idx].float(), scores[b, idx].float(), labels[b, idx], iou_threshold)[:max_det]
        kept_idx.append(idx[keep])
        kept_img.append(torch.full_like(keep, b))
    return _pack(torch.cat(kept_img), torch.cat(kept_idx), batch, max_det, boxes, scores, labels)
