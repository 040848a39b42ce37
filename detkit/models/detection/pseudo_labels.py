"""Pseudo-labels: a teacher's detections kept as training targets for a student, and how good they are.

Both functions are batched and fixed-shape (no ``nonzero``, no boolean-mask indexing, no ``.item()``, no loop over
images), so they run inside a training step without a host synchronisation.

**Which detections become pseudo-labels.** Those scoring above a confidence threshold (Unbiased Teacher, Liu et al.
2021: 0.7 for every class), at most ``max_labels`` per image (the highest-scoring), padded into
:class:`~detkit.structures.Targets` with a ``valid`` mask, so the student's ``loss`` takes them exactly as it takes
ground truth. A fixed threshold is the default because it needs nothing estimated: class-wise thresholds (e.g.
set from each class's precision on a validation split, or adapted to each class's score distribution as in
Consistent-Teacher) help when classes are very unequally confident, but with a handful of labeled images the
estimates they rest on are themselves noisy. ``thresholds`` also takes one value per class for that case, and
:func:`class_confidence` with :func:`adaptive_thresholds` set them from the teacher's own scores (FreeMatch's
self-adaptive class thresholds, Wang et al. 2023, applied to a detector's per-class scores): a class the teacher
scores lower than the others, as a small rare class is while it is still being learnt, gets a proportionally
lower threshold instead of never being pseudo-labelled.
"""

from __future__ import annotations

from typing import Sequence

import torch

from detkit.models.detection.boxes import batched_box_iou
from detkit.structures import Detections, Targets


def score_thresholds(threshold: float | Sequence[float], num_classes: int) -> torch.Tensor:
    """One threshold per class ``[C]`` from one value (every class) or a list of ``C`` values."""
    if isinstance(threshold, (int, float)):
        values = [float(threshold)] * num_classes
    else:
        values = [float(t) for t in threshold]
        if len(values) != num_classes:
            raise ValueError(f"score threshold: give one value or one per class ({num_classes}), got {len(values)}")
    if not all(0.0 <= t <= 1.0 for t in values):
        raise ValueError(f"score thresholds must lie in [0, 1], got {values}")
    return torch.tensor(values, dtype=torch.float32)


def pseudo_label_targets(dets: Detections, thresholds: torch.Tensor | float, max_labels: int,
                         like: Targets | None = None) -> Targets:
    """Pseudo-labels from a teacher's padded :class:`Detections` ``[B, K]``.

    Kept: valid detections whose score is above their class's threshold (``thresholds``: a float, or ``[C]`` on
    the detections' device), the ``max_labels`` highest-scoring per image. Returns :class:`Targets` with
    ``G = max_labels`` rows per image (boxes and labels zero where ``valid`` is False), detached. ``like`` supplies
    ``image_ids``, ``orig_sizes`` and ``scales`` (else -1, zeros and ones).
    """
    scores = dets.scores.detach().float()
    if isinstance(thresholds, torch.Tensor):
        limit = thresholds.to(scores.device)[dets.labels]
    else:
        limit = torch.full_like(scores, float(thresholds))
    keep = dets.valid & (scores > limit)
    b, k = scores.shape
    n = min(max_labels, k)
    order = scores.masked_fill(~keep, float("-inf")).topk(n, dim=1).indices  # kept ones first, by score
    valid = keep.gather(1, order)
    boxes = dets.boxes.detach().float().gather(1, order[..., None].expand(-1, -1, 4)) * valid[..., None]
    labels = dets.labels.gather(1, order) * valid
    if n < max_labels:  # fewer detections than slots: pad to the fixed size
        pad = max_labels - n
        boxes = torch.cat([boxes, boxes.new_zeros(b, pad, 4)], 1)
        labels = torch.cat([labels, labels.new_zeros(b, pad)], 1)
        valid = torch.cat([valid, valid.new_zeros(b, pad)], 1)
    device = scores.device
    if like is not None:
        image_ids, orig_sizes, scales = (t.to(device) for t in (like.image_ids, like.orig_sizes, like.scales))
    else:
        image_ids = torch.full((b,), -1, dtype=torch.int64, device=device)
        orig_sizes = torch.zeros(b, 2, dtype=torch.int64, device=device)
        scales = torch.ones(b, device=device)
    return Targets(boxes, labels, valid, image_ids, orig_sizes, scales)


def match_pseudo_labels(pseudo: Targets, truth: Targets, iou_threshold: float = 0.5,
                        iou: torch.Tensor | None = None) -> torch.Tensor:
    """Which pseudo-labels are true positives against ground truth ``truth``: ``bool [B, G_pseudo]``.

    Class-aware one-to-one matching as COCO evaluation does it: pseudo-labels in their order (by decreasing score,
    as :func:`pseudo_label_targets` returns them) each take the unmatched ground-truth box of their class they
    overlap most, if that IoU is at least ``iou_threshold``. Precision is ``tp.sum() / pseudo.valid.sum()``; recall
    ``tp.sum() / truth.valid.sum()``. Batched; loops over the ``G_pseudo`` slots (a fixed count), not over images.
    ``iou``: the pseudo-labels' IoU with the truth ``[B, P, G]`` when already computed.
    """
    iou = batched_box_iou(pseudo.boxes, truth.boxes) if iou is None else iou  # [B, P, G]
    same = pseudo.labels[:, :, None] == truth.labels[:, None, :]
    ok = (iou >= iou_threshold) & same & pseudo.valid[:, :, None] & truth.valid[:, None, :]
    taken = torch.zeros_like(truth.valid)
    hits = []
    for k in range(pseudo.boxes.shape[1]):
        free = ok[:, k] & ~taken  # [B, G]
        best = iou[:, k].masked_fill(~free, -1.0).argmax(dim=1, keepdim=True)  # [B, 1]
        hit = free.gather(1, best)  # [B, 1]
        taken = taken.scatter(1, best, taken.gather(1, best) | hit)
        hits.append(hit[:, 0])
    if not hits:
        return torch.zeros_like(pseudo.valid)
    return torch.stack(hits, dim=1)


def on_other_class(pseudo: Targets, truth: Targets, iou_threshold: float = 0.5,
                   iou: torch.Tensor | None = None) -> torch.Tensor:
    """Which pseudo-labels lie on an object of *another* class: ``bool [B, G_pseudo]``, true where a valid
    pseudo-label overlaps a ground-truth box of a different class at IoU ``iou_threshold`` or more and no box of its
    own class (a class confusion, e.g. a platelet pseudo-labelled as a red cell; not counted as a localisation
    error). Batched, no host synchronisation. ``iou`` as in :func:`match_pseudo_labels`."""
    iou = batched_box_iou(pseudo.boxes, truth.boxes) if iou is None else iou  # [B, P, G]
    same = pseudo.labels[:, :, None] == truth.labels[:, None, :]
    near = (iou >= iou_threshold) & pseudo.valid[:, :, None] & truth.valid[:, None, :]
    return (near & ~same).any(2) & ~(near & same).any(2)


def per_class_counts(labels: torch.Tensor, mask: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``int64 [C]``: how many entries of ``labels`` (any shape) are set in ``mask`` (same shape), per class."""
    classes = torch.arange(num_classes, device=labels.device)
    return ((labels[..., None] == classes) & mask[..., None]).flatten(0, -2).sum(0)


def class_confidence(dets: Detections, num_classes: int) -> torch.Tensor:
    """How confident the teacher is in each class: ``[C]``, the mean over the ``B`` images of its highest score for
    that class in the image (0 where it has no detection of the class). Batched; no host synchronisation."""
    classes = torch.arange(num_classes, device=dets.labels.device)
    of_class = (dets.labels[..., None] == classes) & dets.valid[..., None]  # [B, K, C]
    best = (dets.scores.detach().float()[..., None] * of_class).amax(dim=1)  # [B, C] (scores are >= 0)
    return best.mean(0)


def adaptive_thresholds(confidence: torch.Tensor, threshold: float, floor: float) -> torch.Tensor:
    """Per-class thresholds ``[C]`` from the classes' confidence levels ``[C]`` (:func:`class_confidence`, averaged
    over steps): ``threshold`` for the most confident class, and for class ``c`` ``threshold * confidence[c] /
    max(confidence)``, never below ``floor`` (a class the teacher does not see at all would otherwise take every
    detection above 0) unless ``threshold`` itself is lower."""
    relative = confidence / confidence.amax().clamp(min=1e-6)
    return (threshold * relative).clamp(min=min(floor, threshold), max=threshold)
