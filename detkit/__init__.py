"""detkit: object detection with self-supervised pretraining.

Conventions used throughout the package:

* Boxes are ``xyxy`` in absolute pixels (float32) everywhere inside detkit; COCO ``xywh`` appears only at the
  two boundaries (reading annotation files in :mod:`detkit.data.coco`, writing result files in
  :mod:`detkit.eval.coco_eval`).
* Detection targets are ``{"boxes": float32 [N, 4] xyxy, "labels": int64 [N]}`` with contiguous foreground
  labels ``0..C-1``; an image without objects has ``boxes`` of shape ``[0, 4]``. Background is never a label in
  targets: the two-stage box predictor uses index ``C`` for it internally (detectron2's convention).
* Images travel from the data loader as ``uint8 [B, 3, H, W]`` RGB; models normalise them on their device with the
  mean/std stored in the encoder, so pretraining and fine-tuning share one normalisation.
"""

__version__ = "0.1.0"
