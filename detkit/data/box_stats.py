"""Statistics of a dataset's boxes at the size the model sees them, and the training image size chosen from them.

Both work on the COCO dict alone (no image is decoded): a box of an image ``W x H`` letterboxed to ``S`` is scaled
by ``S / max(W, H)``.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

#: Bounds of the automatic training size, and the short side (pixels) the smallest objects should keep.
MIN_SIZE, MAX_SIZE, SIZE_STEP = 320, 1024, 32
SMALL_OBJECT_PX = 8.0
SMALL_OBJECT_QUANTILE = 0.1


def letterboxed_boxes(data: dict, image_size: int) -> list[np.ndarray]:
    """Per image (in ``data["images"]`` order) its non-crowd boxes ``[N, 4]`` xyxy in letterboxed pixels."""
    per_image: dict = {}
    for a in data["annotations"]:
        if not a.get("iscrowd", 0):
            per_image.setdefault(a["image_id"], []).append(a["bbox"])
    out = []
    for im in data["images"]:
        xywh = np.asarray(per_image.get(im["id"], []), dtype=np.float64).reshape(-1, 4)
        scale = image_size / max(im["width"], im["height"])
        out.append(np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1) * scale)
    return out


def box_sizes(data: dict, image_size: int) -> np.ndarray:
    """``[N, 2]`` widths and heights of all non-crowd boxes in letterboxed pixels."""
    boxes = np.concatenate(letterboxed_boxes(data, image_size) or [np.zeros((0, 4))])
    return boxes[:, 2:] - boxes[:, :2]


def choose_image_size(data: dict) -> int:
    """The training size (square letterbox side) for a dataset that does not state one.

    The smallest multiple of 32 from 320 at which the smallest objects (the 10th percentile of box short sides)
    keep at least 8 pixels — about one cell of the finest stride-8 feature map — capped at the median image's
    longest side (no upsampling beyond the data's own resolution) and at 1024. Photos with ordinary objects get
    320 (a CPU-friendly size; raise it on a GPU); data of tiny objects gets more.
    """
    native = np.median([max(im["width"], im["height"]) for im in data["images"]]) if data["images"] else MIN_SIZE
    cap = int(min(MAX_SIZE, max(MIN_SIZE, -(-native // SIZE_STEP) * SIZE_STEP)))
    short = np.minimum(*box_sizes(data, MIN_SIZE).T) if data["annotations"] else np.zeros(0)
    size = MIN_SIZE
    if len(short):
        small = float(np.quantile(short, SMALL_OBJECT_QUANTILE))  # at MIN_SIZE; sizes scale linearly
        if small > 0:
            size = int(-(-(MIN_SIZE * SMALL_OBJECT_PX / small) // SIZE_STEP) * SIZE_STEP)
    return int(min(max(size, MIN_SIZE), cap))
