"""Albumentations pipelines that move boxes with the image.

One box format is declared for every pipeline: ``pascal_voc`` (``xyxy`` absolute pixels), detkit's own format,
so no conversion happens here. Every pipeline ends with a letterbox to ``size x size``: the longest side is resized
to ``size`` and the image is padded at the bottom/right, so a box maps back to the original image by dividing by
the scale alone.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import os
import random

import albumentations as A
import cv2
import numpy as np
import torch

#: Pad value for letterboxing (mid-grey, as in YOLO codebases).
PAD_VALUE = 114


def _letterbox(size: int) -> list[A.BasicTransform]:
    return [
        A.LongestMaxSize(max_size=size),
        A.PadIfNeeded(min_height=size, min_width=size, position="top_left", border_mode=cv2.BORDER_CONSTANT,
                      fill=PAD_VALUE),
    ]


#: The augmentation base seed of the epoch being loaded, set around each training item by
#: :class:`detkit.data.shuffle.SeededItems` (``None`` outside a training loader).
_epoch_base: int | None = None


@contextmanager
def epoch_base(seed: int) -> Iterator[None]:
    """Within this block :func:`item_seed` derives item seeds from ``seed`` (an epoch's base seed)."""
    global _epoch_base
    previous, _epoch_base = _epoch_base, int(seed)
    try:
        yield
    finally:
        _epoch_base = previous


def item_seed(index: int) -> int | None:
    """The random seed of dataset item ``index`` in this epoch, or ``None`` when no epoch seed is known.

    In a training loader (:func:`detkit.data.shuffle.epoch_shuffled_loader`) the sampler sends each index with the
    epoch's base seed (a function of the run seed and the epoch, see :class:`detkit.data.shuffle.EpochShuffle`),
    and the seed is a function of that base and the index alone: an item gets the same augmentation whichever
    worker loads it (or the main process, with ``num_workers=0``), workers can persist across epochs, and a resumed
    run reproduces the interrupted one exactly. Elsewhere, in a data-loader worker, the worker's base seed
    (``worker_info.seed - worker_info.id``) takes the epoch base's place; in the main process it is ``None``.
    """
    base = _epoch_base
    if base is None:
        info = torch.utils.data.get_worker_info()
        if info is None:
            return None
        base = info.seed - info.id
    return hash((base, index)) % 2**32


class SeededPipeline:
    """An albumentations ``Compose`` with reproducible randomness.

    albumentations 2.x seeds every ``Compose`` from OS entropy, so two runs with the same ``seed`` would differ.
    Called with ``seed`` (see :func:`item_seed`; training loaders always give one, in workers and in the main
    process), the pipeline is reseeded for that call; without one (a dataset read outside a training loader) it is
    seeded once from ``torch.initial_seed()`` and its ``stream`` id and then draws a continuing stream. Every step of
    the pipeline draws from the same stream, so the steps' draws are independent of each other.
    """

    def __init__(self, pipeline: A.Compose, stream: int = 0) -> None:
        self.pipeline = pipeline
        self.stream = stream  # tells apart pipelines of one item seeded from the same torch.initial_seed()
        self._seeded_for: tuple[int, int] | None = None

    def _reseed(self, seed: int) -> None:
        # One stream shared by every step. ``Compose.set_random_seed(seed)`` would give each step its own
        # generators seeded with the same value (albumentations 2.0), so the steps' draws coincide: ToGray's
        # p-test reads HorizontalFlip's number and a grayscale view is always a flipped one, vflip follows hflip,
        # the crop's area follows the jitter's brightness (tests/data/test_independent_draws.py).
        self.pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))

    def __call__(self, seed: int | None = None, **data):
        if seed is not None:
            self._reseed(seed)
            self._seeded_for = None
        else:
            key = (os.getpid(), torch.initial_seed())
            if key != self._seeded_for:
                self._reseed(hash((torch.initial_seed(), self.stream)) % 2**32)  # ints hash alike in every process
                self._seeded_for = key
        return self.pipeline(**data)


class DetectionTransform:
    """Callable ``(image uint8 [H, W, 3], boxes float32 [N, 4] xyxy, labels int64 [N], seed=None) -> (image,
    boxes, labels, scale)``; ``scale`` is the letterbox factor (output pixels per input pixel) used to map
    predictions back, ``seed`` fixes the random draws of this call (see :func:`item_seed`).

    Args:
        size: output side length (square letterbox).
        train: add the augmentations below; otherwise resize/letterbox only.
        hflip, vflip: flip probabilities.
        scale_range: random rescale factor range ``(lo, hi)`` applied before a random ``size x size`` crop.
        color_jitter: brightness/contrast/saturation strength (0 disables); hue is a tenth of it.
        min_visibility: a box cropped to less than this fraction of its area is removed with its label.
    """

    def __init__(
        self,
        size: int = 320,
        train: bool = False,
        hflip: float = 0.5,
        vflip: float = 0.0,
        scale_range: Sequence[float] = (0.8, 1.2),
        color_jitter: float = 0.2,
        min_visibility: float = 0.3,
    ) -> None:
        self.size = int(size)
        steps: list[A.BasicTransform] = [A.LongestMaxSize(max_size=self.size)]
        if train:
            lo, hi = scale_range
            if (lo, hi) != (1.0, 1.0):
                steps.append(A.RandomScale(scale_limit=(lo - 1.0, hi - 1.0), p=1.0))
            steps += [
                A.PadIfNeeded(self.size, self.size, position="top_left", border_mode=cv2.BORDER_CONSTANT,
                              fill=PAD_VALUE),
                A.RandomCrop(self.size, self.size),
                A.HorizontalFlip(p=hflip),
                A.VerticalFlip(p=vflip),
            ]
            if color_jitter > 0:
                c = color_jitter
                steps.append(A.ColorJitter(brightness=c, contrast=c, saturation=c, hue=c / 10, p=0.8))
        steps += _letterbox(self.size)[1:]
        self.pipeline = SeededPipeline(A.Compose(
            steps,
            bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"], min_visibility=min_visibility,
                                     clip=True, filter_invalid_bboxes=True),
        ))

    def __call__(
        self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, seed: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        scale = self.size / max(image.shape[0], image.shape[1])
        out = self.pipeline(seed=seed, image=image, bboxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                            labels=np.asarray(labels, dtype=np.int64))
        out_boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
        out_labels = np.asarray(out["labels"], dtype=np.int64).reshape(-1)
        return out["image"], out_boxes, out_labels, scale


class LetterboxImage:
    """Letterbox a bare image (no boxes), as for prediction: ``image -> (image, scale)``."""

    def __init__(self, size: int = 320) -> None:
        self.size = int(size)
        self.pipeline = A.Compose(_letterbox(self.size))

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        scale = self.size / max(image.shape[0], image.shape[1])
        return self.pipeline(image=image)["image"], scale
