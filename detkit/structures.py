"""The types that cross floors: ground truth from the data loader (:class:`Targets`), region proposals between a
detector's stages (:class:`Proposals`) and detections out of every detector (:class:`Detections`).

This is detkit's ground floor: data, models, eval, lit and cli import it; it imports nothing from detkit. Each type
is a named tuple of fixed-shape, padded tensors (a ``valid`` mask marks the real rows), so a batch needs no
per-image lists inside a training step, the data loader pins it, and Lightning moves it to the device as it moves a
tensor.

The data contract, collate to loss: ``detection_collate`` returns ``(images uint8 [B, 3, H, W], Targets)``; every
detector's ``loss(images, targets)`` takes those :class:`Targets` (or a list of per-image dicts, padded once by
:func:`as_targets`) and its ``predict(images)`` returns :class:`Detections` in input (letterboxed) pixels, which
:mod:`detkit.eval` maps back to original pixels with ``Targets.scales``.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch

#: The box dimension ``G`` of :class:`Targets` is padded to a multiple of this, so that the shapes a compiled model
#: sees come from a small set (``torch.compile`` specialises on shapes).
BOX_PAD_MULTIPLE = 8


class Targets(NamedTuple):
    """Padded ground truth of a batch of ``B`` images with at most ``G`` boxes each.

    Attributes:
        boxes: ``float32 [B, G, 4]`` ``xyxy`` in input (letterboxed) pixels; padding rows are zeros.
        labels: ``int64 [B, G]`` contiguous labels ``0..C-1``; padding rows are 0.
        valid: ``bool [B, G]``, False for padding (an image without objects has no valid row).
        image_ids: ``int64 [B]`` original COCO image ids (-1 when unknown).
        orig_sizes: ``int64 [B, 2]`` original ``(height, width)``.
        scales: ``float32 [B]`` input pixels per original pixel (letterbox factor; padding is bottom/right).
    """

    boxes: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor
    image_ids: torch.Tensor
    orig_sizes: torch.Tensor
    scales: torch.Tensor

    @classmethod
    def from_list(cls, targets: Sequence[dict[str, Any]], pad_multiple: int = BOX_PAD_MULTIPLE,
                  device: torch.device | str | None = None) -> "Targets":
        """Pad per-image dicts (``boxes [N_i, 4]``, ``labels [N_i]``, optional ``image_id``, ``orig_size``,
        ``scale``) once. ``G = max_i N_i`` rounded up to ``pad_multiple`` (at least ``pad_multiple``)."""
        b = len(targets)
        most = max([0] + [len(t["boxes"]) for t in targets])
        g = max(1, -(-most // pad_multiple)) * pad_multiple
        boxes = torch.zeros(b, g, 4)
        labels = torch.zeros(b, g, dtype=torch.int64)
        valid = torch.zeros(b, g, dtype=torch.bool)
        for i, t in enumerate(targets):  # runs in the loader's collate (a worker), once per image
            n = len(t["boxes"])
            boxes[i, :n] = torch.as_tensor(t["boxes"], dtype=torch.float32).reshape(n, 4)
            labels[i, :n] = torch.as_tensor(t["labels"], dtype=torch.int64)
            valid[i, :n] = True
        image_ids = torch.tensor([int(t.get("image_id", -1)) for t in targets], dtype=torch.int64)
        orig_sizes = torch.stack([torch.as_tensor(t["orig_size"], dtype=torch.int64) if "orig_size" in t
                                  else torch.zeros(2, dtype=torch.int64) for t in targets]) if b else \
            torch.zeros(0, 2, dtype=torch.int64)
        scales = torch.tensor([float(t.get("scale", 1.0)) for t in targets], dtype=torch.float32)
        out = cls(boxes, labels, valid, image_ids, orig_sizes, scales)
        return out.to(device) if device is not None else out

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Targets":
        return Targets(*(t.to(device, non_blocking=non_blocking) for t in self))

    @property
    def num_images(self) -> int:
        return self.boxes.shape[0]

    def image(self, i: int) -> dict[str, torch.Tensor]:
        """Image ``i``'s valid boxes and labels, ``{"boxes" [n, 4], "labels" [n]}`` (tests, reports; not hot paths)."""
        keep = self.valid[i]
        return {"boxes": self.boxes[i][keep], "labels": self.labels[i][keep]}


def as_targets(targets: Targets | Sequence[dict[str, Any]], device: torch.device) -> Targets:
    """The detectors' entry point: :class:`Targets` pass through (moved to ``device``), a list of per-image dicts
    (convenient in tests and notebooks) is padded once."""
    if isinstance(targets, Targets):
        return targets.to(device)
    return Targets.from_list(targets, device=device)


class Proposals(NamedTuple):
    """``boxes [B, P, 4]`` (xyxy input pixels, float32, detached) and ``valid [B, P]``, sorted by decreasing
    objectness within each image; ``nonfinite`` counts the top candidates whose box or score was not finite (a
    diverging RPN; they are never proposed)."""

    boxes: torch.Tensor
    valid: torch.Tensor
    nonfinite: torch.Tensor


class Detections(NamedTuple):
    """Padded per-image detections, sorted by decreasing score: ``boxes [B, K, 4]`` xyxy (float32), ``scores
    [B, K]``, ``labels [B, K]`` int64 and ``valid [B, K]`` bool (False for padding)."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor

    def to_list(self) -> list[dict[str, torch.Tensor]]:
        """Per image ``{"boxes" [n, 4], "scores" [n], "labels" [n]}`` (on the host side; not for hot paths)."""
        return [{"boxes": b[v], "scores": s[v], "labels": c[v]}
                for b, s, c, v in zip(self.boxes, self.scores, self.labels, self.valid)]

    def cpu(self) -> "Detections":
        return Detections(*(t.cpu() for t in self))
